"""HTTP plumbing of the hub routes: errors in the Hugging Face Hub's shape (JSON `{"error": ...}` plus the
`X-Error-Code` header its client reads), the bearer token, signed upload URLs and file responses with ranges."""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from loramux.core.adapter_config import AdapterConfigError
from loramux.registry.blobs import BlobError
from loramux.registry.names import InvalidNameError
from loramux.registry.registry import (
    CommitError,
    ConflictError,
    EntryNotFoundError,
    Forbidden,
    RepoNotFoundError,
    RevisionNotFoundError,
    Unauthorized,
)
from loramux.registry.store import RepoExistsError, StorageUnavailableError

log = logging.getLogger(__name__)


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# exception -> (HTTP status, X-Error-Code); the first match wins, so subclasses come first.
_ERRORS: list[tuple[type[BaseException], int, str | None]] = [
    (RepoNotFoundError, 404, "RepoNotFound"),
    (RevisionNotFoundError, 404, "RevisionNotFound"),
    (EntryNotFoundError, 404, "EntryNotFound"),
    (Unauthorized, 401, None),
    (Forbidden, 403, None),
    (RepoExistsError, 409, None),
    (ConflictError, 412, None),
    (InvalidNameError, 400, None),
    (AdapterConfigError, 422, None),
    (CommitError, 422, None),
    (BlobError, 500, None),
]
RETRY_AFTER_SECONDS = 5  # what a 503 asks the client to wait


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    # A header value may not end in whitespace (h11 refuses to send it), which a cut at 200 characters can leave.
    first_line = (message.splitlines() or [""])[0][:200].strip()
    headers = {"X-Error-Message": first_line.encode("ascii", "replace").decode()}
    if code:
        headers["X-Error-Code"] = code
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class HubRoute(APIRoute):
    """Turns the registry's exceptions into Hub-shaped error responses; travels with the router, so an app that
    includes the hub routes gets the same errors without registering handlers."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except HubHTTPError as exc:
                return error_response(exc.status, exc.message, exc.code)
            except StorageUnavailableError as exc:  # details (hosts, bucket) in the log, not in the answer
                log.error("%s %s: %s", request.method, request.url.path, exc)
                return error_response(503, exc.public_message)
            except Exception as exc:
                for kind, status, code in _ERRORS:
                    if isinstance(exc, kind):
                        if status >= 500:
                            log.error("%s %s: %s", request.method, request.url.path, exc)
                        return error_response(status, _message(exc), code)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    # Nothing was recorded (blobs appear only whole, revisions only after them): say so and why.
                    log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
                    return error_response(507, "the hub's disk is full; nothing was stored: free space and retry")
                raise

        return handle


def _message(exc: Exception) -> str:
    """The exception's own text: a KeyError's str() quotes it, no other exception's does (a message ending in a
    quoted name keeps its closing quote)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def endpoint_of(request: Request) -> str:
    """The URL the client called us at: URLs we return must start with it (the client parses them)."""
    return str(request.base_url).rstrip("/")


def iso_date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class UploadSigner:
    """Signs LFS upload URLs: the client PUTs file content without its token (as to S3), so the URL itself
    carries the permission, for one blob of one size, for a limited time."""

    def __init__(self, secret: bytes | None = None, ttl_seconds: int = 3600) -> None:
        self.secret, self.ttl = secret or secrets.token_bytes(32), ttl_seconds

    def sign(self, oid: str, size: int) -> tuple[int, str]:
        expires = int(time.time()) + self.ttl
        return expires, self._mac(oid, size, expires)

    def check(self, oid: str, size: int, expires: int, signature: str) -> bool:
        # As bytes: compare_digest refuses str with non-ASCII characters, which a forged URL may carry.
        expected = self._mac(oid, size, expires).encode()
        return expires >= time.time() and hmac.compare_digest(expected, signature.encode("utf-8", "replace"))

    def _mac(self, oid: str, size: int, expires: int) -> str:
        return hmac.new(self.secret, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` -> (start, end inclusive); None for no range. Raises
    HubHTTPError(416) when it cannot be satisfied. Multiple ranges are not supported."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    first, sep, last = spec.strip().partition("-")
    try:
        if unit.strip() != "bytes" or not sep or "," in spec:
            raise ValueError
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), (int(last) if last else size - 1)
    except ValueError:
        raise HubHTTPError(416, f"unsupported Range header {header!r}") from None
    end = min(end, size - 1)
    if start < 0 or start > end:
        raise HubHTTPError(416, f"range {header!r} is outside the file's {size} bytes")
    return start, end


def file_response(path: Path, size: int, headers: dict[str, str], range_header: str | None, head: bool) -> Response:
    span = parse_range(range_header, size) if size else None
    headers = {**headers, "Accept-Ranges": "bytes"}
    if head:
        return Response(status_code=200, headers={**headers, "Content-Length": str(size)})
    start, end = span if span else (0, size - 1)
    if span:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1 if size else 0)
    return StreamingResponse(
        _read(path, start, end + 1), status_code=206 if span else 200, headers=headers,
        media_type="application/octet-stream",
    )  # fmt: skip


def _read(path: Path, start: int, stop: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = stop - start
        while remaining > 0:
            chunk = f.read(min(1 << 20, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
