"""The blob store on S3 or any S3-compatible store (MinIO, Ceph's RADOS Gateway), shared by every process pointed
at one `--blob-url s3://bucket/prefix`.

Objects are named `prefix/ab/cdef...` after their sha256, like the local store's files. A put hashes the stream into
a local temporary file first (the name is the hash), then uploads it; an object therefore appears whole or not at
all. Reads go through a local cache of verified copies (`verified_path` hands out a local path, which the adapter
loader and the download route read): a blob is downloaded once per machine, checked against its sha256, and
served from the cache after that; a cached copy damaged on disk is hashed again (its mtime changed) and fetched
anew. A damaged object in the bucket is refused like a damaged local file.

Endpoint, region and credentials come from the usual places of boto3 (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, instance roles). A bucket that cannot be reached
raises `StorageUnavailableError` (HTTP 503); nothing half-written is left in the bucket.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from loramux.registry.blobs import (
    CHUNK,
    PARTIAL_GRACE_SECONDS,
    BlobError,
    CorruptBlobError,
    hash_file,
    remove_stale_files,
    spooled_upload,
)
from loramux.registry.names import SHA256
from loramux.registry.store import StorageUnavailableError

_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_blob_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    if not url.startswith("s3://"):
        raise ValueError(f"the blob URL must be s3://BUCKET[/PREFIX], not {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"the blob URL {url!r} names no bucket")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3BlobStore:
    """`BlobStore` on an S3 bucket (`url`: `s3://bucket/prefix`), with verified copies cached in `cache_dir`."""

    def __init__(self, url: str, cache_dir: Path, client=None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_blob_url(url)
        self.cache = Path(cache_dir)
        (self.cache / "tmp").mkdir(parents=True, exist_ok=True)
        self.client = client or _client()
        # Cached copies already hashed since their file last changed: sha256 -> (inode, size, mtime).
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        with _unavailable(f"the bucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)  # fail at start, with the reason, on a wrong URL or key

    def _key(self, sha256: str) -> str:
        if not SHA256.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        return f"{self.prefix}{sha256[:2]}/{sha256[2:]}"

    def _cached(self, sha256: str) -> Path:
        return self.cache / sha256[:2] / sha256[2:]

    def put(
        self, stream: BinaryIO, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> tuple[str, int]:
        # The bucket keeps the object, so the local copy (the cache's) need not be synced first.
        with spooled_upload(stream, self.cache / "tmp", expected_sha256, max_bytes, durable=False) as (
            tmp_name,
            sha,
            size,
        ):
            # A single PUT, or a multipart upload that S3 assembles only when it completes: never half an object.
            with _unavailable(f"the bucket {self.bucket}"):
                self.client.upload_file(tmp_name, self.bucket, self._key(sha))
            self._keep(tmp_name, sha)
            return sha, size

    def exists(self, sha256: str) -> bool:
        key = self._key(sha256)
        try:
            with _unavailable(f"the bucket {self.bucket}"):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except StorageUnavailableError as exc:
            if _missing(exc.__cause__):
                return False
            raise
        return True

    def verified_path(self, sha256: str) -> Path:
        path = self._cached(sha256) if SHA256.fullmatch(sha256) else None
        if path is None:
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        try:
            stat = path.stat()
        except FileNotFoundError:
            return self._download(sha256)
        with self._lock:
            if self._verified.get(sha256) == (stat.st_ino, stat.st_size, stat.st_mtime_ns):
                return path
        if hash_file(path) == sha256:
            self._remember(sha256, path)
            return path
        path.unlink(missing_ok=True)  # the cached copy was damaged: the bucket's is the original
        return self._download(sha256)

    def _download(self, sha256: str) -> Path:
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.cache / "tmp", prefix="download-")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with _unavailable(f"the bucket {self.bucket}"):
                        body = self.client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"]
                        for chunk in body.iter_chunks(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                except StorageUnavailableError as exc:
                    if _missing(exc.__cause__):
                        raise BlobError(f"blob {sha256} is missing from the blob store") from exc
                    raise
            if digest.hexdigest() != sha256:
                raise CorruptBlobError(f"blob {sha256} is corrupted (its content no longer matches its sha256)")
            return self._keep(tmp_name, sha256)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    def _keep(self, tmp_name: str, sha256: str) -> Path:
        """Move a file whose content was just hashed to `sha256` into the cache."""
        path = self._cached(sha256)
        path.parent.mkdir(exist_ok=True)
        os.replace(tmp_name, path)  # atomic: readers of the cache never see half a copy
        self._remember(sha256, path)
        return path

    def _remember(self, sha256: str, path: Path) -> None:
        stat = path.stat()
        with self._lock:
            self._verified[sha256] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def delete(self, sha256: str) -> None:
        key = self._key(sha256)
        with _unavailable(f"the bucket {self.bucket}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)
        with self._lock:
            self._verified.pop(sha256, None)
        self._cached(sha256).unlink(missing_ok=True)

    def remove_partial_uploads(self, older_than_seconds: float = PARTIAL_GRACE_SECONDS) -> int:
        """Delete the local copies that crashed uploads and downloads left in the cache's `tmp/` (S3 itself never
        shows half an object; a bucket lifecycle rule ends multipart uploads never completed)."""
        return remove_stale_files(self.cache / "tmp", older_than_seconds)

    def all_blobs(self) -> Iterable[tuple[str, float]]:
        with _unavailable(f"the bucket {self.bucket}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    sha = obj["Key"][len(self.prefix) :].replace("/", "")
                    if SHA256.fullmatch(sha) and obj["Key"] == self._key(sha):
                        yield sha, obj["LastModified"].timestamp()


def _client():
    # Endpoint from the standard variables, with path-style addressing there: S3-compatible stores (MinIO, Ceph, a
    # local test server) are commonly reached by address, where bucket.host names do not resolve. Checksums only
    # where S3 requires them: some S3-compatible stores refuse the newer default ones; every blob is checked
    # against its sha256 on download anyway. Standard retries: a few attempts with short back-off, then a 503.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard")},
        s3={"addressing_style": "path"} if endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Turn boto3's errors into `StorageUnavailableError` (the original as its cause)."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        reason = f"{error.get('Code', '?')}: {error.get('Message') or exc}"
        raise StorageUnavailableError(f"{what} refused the request ({reason})", "bucket") from exc
    except (BotoCoreError, Boto3Error) as exc:
        raise StorageUnavailableError(f"{what} cannot be reached: {exc}", "bucket") from exc


def _missing(exc: BaseException | None) -> bool:
    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _MISSING
