"""The Xet storage routes that huggingface_hub uploads through whenever `hf_xet` is installed (from version 1.20 it
asks no server whether to: every file the preupload answer marks `lfs` goes through Xet).

The client's way: `GET /api/models/{ns}/{name}/xet-write-token/{rev}` (the hub route, `token_response`) gives it a
CAS URL and a short-lived token; at that URL it may ask whether chunks are known (`GET /v1/chunks/...`: never here,
404), then posts xorbs (`POST /v1/xorbs/default/{hash}`: a run of chunks, each raw, LZ4 or byte-grouped LZ4) and a
shard (`POST /v1/shards`: every file as ranges of chunks in those xorbs, with its sha256). On the shard the hub
rebuilds each file from the xorbs and stores it in the blob store under its sha256, which the NDJSON commit then
names as an `lfsFile`: past the shard, a Xet upload is an LFS upload. Downloads stay plain HTTP (`/resolve/`
sends no `X-Xet-Hash`).

Xorbs are kept per namespace (a tenant never builds a file out of another's xorbs) under the registry's
`xorbs/` folder, since the client may refer to them again in a later push instead of uploading them twice;
`Registry.collect_garbage` removes those not used for `XORB_RETENTION_SECONDS`. A file is trusted only once
rebuilt and matched against its sha256, so a xorb's own hash is taken as given.
"""

# No `from __future__ import annotations`: FastAPI must see the route signatures' real types.
import hashlib
import hmac
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from loramux.registry.http import HubHTTPError, HubRoute, bearer_token
from loramux.registry.names import check_part

CAS_PREFIX = "/xet"  # the CAS URL is the hub's endpoint + this + "/" + the xorb store's id
TOKEN_TTL_SECONDS = 3600
MAX_XORB_BYTES = 80 << 20  # 64 MiB of chunks, the protocol's limit, plus the footer of hashes and offsets
MAX_SHARD_BYTES = 64 << 20
XORB_RETENTION_SECONDS = 7 * 24 * 3600

_CHUNK_HEADER = struct.Struct("<B3sB3s")  # version, compressed size (u24), compression scheme, raw size (u24)
_FOOTER_IDENT = b"XETBLOB"
_LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
_ENTRY = 48  # every record of a shard's file and CAS sections
_BOOKEND = b"\xff" * 32
_WITH_VERIFICATION = 1 << 31
_WITH_METADATA_EXT = 1 << 30


class XetFormatError(ValueError):
    """A xorb or shard that does not parse, or a file that does not rebuild to its sha256."""


# ---- tokens -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XetGrant:
    namespace: str  # where the holder's xorbs live
    write: bool


class XetTokens:
    """Short-lived CAS tokens: `namespace.scope.expires.mac`, signed with a per-process secret."""

    def __init__(self, secret: bytes | None = None, ttl_seconds: int = TOKEN_TTL_SECONDS) -> None:
        self.secret, self.ttl = secret or secrets.token_bytes(32), ttl_seconds

    def issue(self, namespace: str, write: bool) -> tuple[str, int]:
        expires = int(time.time()) + self.ttl
        body = f"{namespace}.{'write' if write else 'read'}.{expires}"
        return f"{body}.{self._mac(body)}", expires

    def check(self, token: str | None, write: bool) -> XetGrant:
        namespace, scope, expires, mac = (token or "").rsplit(".", 3) if (token or "").count(".") >= 3 else ("",) * 4
        body = f"{namespace}.{scope}.{expires}"
        if not mac or not hmac.compare_digest(self._mac(body).encode(), mac.encode("utf-8", "replace")):
            raise HubHTTPError(401, "invalid Xet token: ask the hub's xet-write-token route for a new one")
        if not expires.isdigit() or int(expires) < time.time():
            raise HubHTTPError(401, "the Xet token has expired: ask the hub's xet-write-token route for a new one")
        if write and scope != "write":
            raise HubHTTPError(403, "this Xet token may only read")
        return XetGrant(check_part(namespace, "namespace"), scope == "write")

    def _mac(self, body: str) -> str:
        return hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()


def token_response(tokens: XetTokens, cas_url: str, namespace: str, write: bool) -> tuple[dict, dict]:
    """The token route's answer, (JSON body, headers), as huggingface.co gives it: both carry the same values."""
    token, expires = tokens.issue(namespace, write)
    headers = {"X-Xet-Cas-Url": cas_url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(expires)}
    return {"casUrl": cas_url, "accessToken": token, "exp": expires}, headers


# ---- formats ------------------------------------------------------------------------------------------------------


def hash_name(raw: bytes) -> str:
    """A 32-byte Xet hash as the protocol writes it in URLs: each 8-byte word as a little-endian u64 in hex."""
    return "".join(f"{word:016x}" for word in struct.unpack("<4Q", raw))


def xorb_chunks(data: bytes) -> list[tuple[int, int, int, int]]:
    """(offset of the compressed bytes, compressed size, scheme, raw size) of every chunk of a serialized xorb; the
    footer of hashes and offsets that may follow the chunks is not needed."""
    chunks, offset = [], 0
    while offset < len(data) and not data.startswith(_FOOTER_IDENT, offset):
        if offset + _CHUNK_HEADER.size > len(data):
            raise XetFormatError(f"xorb ends inside a chunk header at byte {offset}")
        version, packed, scheme, raw = _CHUNK_HEADER.unpack_from(data, offset)
        size, raw_size = int.from_bytes(packed, "little"), int.from_bytes(raw, "little")
        offset += _CHUNK_HEADER.size
        if version != 0 or scheme > 2 or offset + size > len(data):
            raise XetFormatError(f"xorb chunk {len(chunks)} has a malformed header")
        chunks.append((offset, size, scheme, raw_size))
        offset += size
    if not chunks:
        raise XetFormatError("the xorb holds no chunk")
    return chunks


def chunk_bytes(data: bytes, chunk: tuple[int, int, int, int]) -> bytes:
    """One chunk's raw bytes (see `xorb_chunks`)."""
    import lz4.block
    import lz4.frame

    offset, size, scheme, raw_size = chunk
    payload = data[offset : offset + size]
    try:
        if scheme == 0:
            out = payload
        elif payload.startswith(_LZ4_FRAME_MAGIC):
            out = lz4.frame.decompress(payload)
        else:
            out = lz4.block.decompress(payload, uncompressed_size=raw_size)
    except (RuntimeError, ValueError) as exc:
        raise XetFormatError(f"a xorb chunk does not decompress: {exc}") from exc
    if len(out) != raw_size:
        raise XetFormatError(f"a xorb chunk holds {len(out)} bytes, its header says {raw_size}")
    if scheme == 2:  # byte-grouped: all first bytes of each 4, then all second bytes, ...; undo it
        out = _ungroup4(out)
    return out


def _ungroup4(grouped: bytes) -> bytes:
    n = len(grouped)
    out = bytearray(n)
    start = 0
    for k in range(4):
        count = n // 4 + (1 if k < n % 4 else 0)  # the first n % 4 groups hold one byte more
        out[k::4] = grouped[start : start + count]
        start += count
    return bytes(out)


@dataclass(frozen=True)
class Term:
    xorb: str  # hash name
    start: int  # chunk range [start, end) of the xorb
    end: int
    size: int  # raw bytes of the range


@dataclass(frozen=True)
class ShardFile:
    sha256: str
    terms: list[Term]

    @property
    def size(self) -> int:
        return sum(t.size for t in self.terms)


def shard_files(data: bytes) -> list[ShardFile]:
    """The files a shard declares (its file info section). Each must carry its sha256 (the metadata extension every
    shard upload has)."""
    if len(data) < 48 or struct.unpack_from("<Q", data, 32)[0] != 2:
        raise XetFormatError("not a shard of format version 2")
    files, offset = [], 48
    while True:
        if offset + _ENTRY > len(data):
            raise XetFormatError("the shard's file section has no end marker")
        if data[offset : offset + 32] == _BOOKEND:
            return files
        flags, count = struct.unpack_from("<II", data, offset + 32)
        offset += _ENTRY
        terms = []
        for _ in range(count):
            if offset + _ENTRY > len(data):
                raise XetFormatError("the shard ends inside a file's entries")
            _, _, size, start, end = struct.unpack_from("<32sIIII", data, offset)
            if end <= start:
                raise XetFormatError("a file's chunk range is empty")
            terms.append(Term(hash_name(data[offset : offset + 32]), start, end, size))
            offset += _ENTRY
        if flags & _WITH_VERIFICATION:
            offset += count * _ENTRY
        if not flags & _WITH_METADATA_EXT or offset + _ENTRY > len(data):
            raise XetFormatError("a file of the shard has no sha256 (metadata extension)")
        # The sha256 is stored as the protocol stores every hash: four little-endian u64 words.
        files.append(ShardFile(hash_name(data[offset : offset + 32]), terms))
        offset += _ENTRY


# ---- storage ------------------------------------------------------------------------------------------------------


class XorbStore:
    """Xorbs as files `root/<namespace>/<hash name>`, written whole (temporary file, then rename).

    `store_id` names this store's content in the CAS URL. The client keeps the shards it uploaded in a cache keyed
    by that URL and later refers to their xorbs without uploading them again; so the id changes whenever xorbs are
    deleted, and differs between data directories served at the same address, so that no client counts on a xorb
    this store does not hold."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._id_file = self.root / ".store-id"
        if not self._id_file.is_file():
            self._new_store_id()

    @property
    def store_id(self) -> str:
        return self._id_file.read_text().strip()

    def _new_store_id(self) -> None:
        tmp = self._id_file.with_suffix(f".{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_hex(8) + "\n")
        os.replace(tmp, self._id_file)

    def _path(self, namespace: str, name: str) -> Path:
        if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            raise HubHTTPError(400, f"{name!r} is not a Xet hash (64 lowercase hex digits)")
        return self.root / check_part(namespace, "namespace") / name

    def put(self, namespace: str, name: str, data: bytes) -> bool:
        """Store a xorb (checked to parse and decompress); False if it was already stored with the same bytes."""
        path = self._path(namespace, name)
        if path.is_file() and path.read_bytes() == data:
            os.utime(path)
            return False
        for chunk in xorb_chunks(data):
            chunk_bytes(data, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True

    def get(self, namespace: str, name: str) -> bytes:
        path = self._path(namespace, name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise XetFormatError(
                f"xorb {name} is not stored on this hub (never uploaded, or collected after a week unused): clear the "
                "client's Xet cache (~/.cache/huggingface/xet) and push again"
            ) from None
        os.utime(path)  # in use: kept for another retention period
        return data

    def collect(self, older_than_seconds: float) -> int:
        """Delete xorbs (and abandoned partial writes) unused for `older_than_seconds`; returns how many."""
        deleted = 0
        for folder in self.root.iterdir():
            for file in folder.iterdir() if folder.is_dir() else ():
                if time.time() - file.stat().st_mtime > older_than_seconds:
                    file.unlink(missing_ok=True)
                    deleted += 1
        if deleted:
            self._new_store_id()
        return deleted


def rebuild(xorbs: XorbStore, namespace: str, file: ShardFile) -> Iterator[bytes]:
    """The bytes of a shard's file, term by term, from the namespace's xorbs."""
    cache: dict[str, tuple[bytes, list]] = {}
    for term in file.terms:
        if term.xorb not in cache:
            data = xorbs.get(namespace, term.xorb)
            cache.clear()  # a file's terms come xorb after xorb: keep one xorb in memory
            cache[term.xorb] = (data, xorb_chunks(data))
        data, chunks = cache[term.xorb]
        if term.end > len(chunks):
            raise XetFormatError(f"xorb {term.xorb} has {len(chunks)} chunks, a file asks for {term.start}..{term.end}")
        pieces = [chunk_bytes(data, chunk) for chunk in chunks[term.start : term.end]]
        if sum(map(len, pieces)) != term.size:
            raise XetFormatError(f"chunks {term.start}..{term.end} of xorb {term.xorb} do not hold {term.size} bytes")
        yield from pieces


class _Chunks:
    """A file-like reader over an iterator of byte strings (what the blob store reads from)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces, self.buffer = pieces, b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buffer) < n:
            piece = next(self.pieces, None)
            if piece is None:
                break
            self.buffer += piece
        out, self.buffer = (self.buffer, b"") if n < 0 else (self.buffer[:n], self.buffer[n:])
        return out


# ---- routes -------------------------------------------------------------------------------------------------------


def xet_router(registry, tokens: XetTokens) -> APIRouter:
    """The CAS routes under `CAS_PREFIX`/{store id}; `registry.xorbs` holds the xorbs. Any store id is taken: it
    only keys the client's cache (see `XorbStore`), and a token issued before the id changed stays good."""
    router = APIRouter(prefix=CAS_PREFIX + "/{store}", route_class=HubRoute)

    @router.get("/v1/chunks/{prefix}/{name}")
    def query_chunk(request: Request, prefix: str, name: str) -> dict:
        tokens.check(bearer_token(request), write=False)
        raise HubHTTPError(404, "no chunk index on this hub: upload the chunks")

    @router.post("/v1/xorbs/{prefix}/{name}")
    async def upload_xorb(request: Request, prefix: str, name: str) -> dict:
        grant = tokens.check(bearer_token(request), write=True)
        data = await _read_body(request, MAX_XORB_BYTES, "xorb")
        try:
            inserted = await run_in_threadpool(registry.xorbs.put, grant.namespace, name, data)
        except XetFormatError as exc:
            raise HubHTTPError(400, str(exc)) from exc
        return {"was_inserted": inserted}

    @router.post("/v1/shards")
    async def upload_shard(request: Request) -> dict:
        grant = tokens.check(bearer_token(request), write=True)
        data = await _read_body(request, MAX_SHARD_BYTES, "shard")
        try:
            await run_in_threadpool(_store_files, registry, grant.namespace, shard_files(data))
        except XetFormatError as exc:
            raise HubHTTPError(400, str(exc)) from exc
        return {"result": 1}

    return router


def _store_files(registry, namespace: str, files: list[ShardFile]) -> None:
    for file in files:
        if file.size > registry.limits.max_model_file_bytes:
            raise HubHTTPError(413, f"a file of {file.size} bytes is over the limit of "
                               f"{registry.limits.max_model_file_bytes}")  # fmt: skip
        if registry.blobs.exists(file.sha256):
            try:
                registry.blobs.verified_path(file.sha256)
                continue  # already stored and intact
            except OSError:
                pass  # damaged: the rebuilt file replaces it
        try:
            registry.store_blob(_Chunks(rebuild(registry.xorbs, namespace, file)), expected_sha256=file.sha256)
        except XetFormatError:
            raise
        except ValueError as exc:  # the rebuilt bytes do not match the declared sha256
            raise XetFormatError(f"a file of the shard does not rebuild to its sha256: {exc}") from exc


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise HubHTTPError(413, f"the {what} is over {limit} bytes")
    return bytes(body)
