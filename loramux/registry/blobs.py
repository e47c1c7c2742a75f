"""The blob store: file contents addressed by their sha256. A local directory by default; an S3 bucket shared by
several machines in `s3_blobs.py`.

A blob is written to a temporary file, fsynced and renamed into place, so a crash never leaves a half-written blob
under its final name, and it is checked against its sha256 again before it is served.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from loramux.registry.names import SHA256

CHUNK = 1 << 20


class BlobError(OSError):
    """A blob is missing, or its content does not match its sha256 (corrupted): it is never served."""


class CorruptBlobError(BlobError):
    pass


class BlobStore(Protocol):
    def put(
        self, stream: BinaryIO, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> tuple[str, int]:
        """Store a stream's bytes; returns (sha256, size). Raises ValueError on a sha256 mismatch or over max_bytes."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def verified_path(self, sha256: str) -> Path:
        """A local path holding the blob, checked against its sha256; raises BlobError (missing or corrupt)."""
        ...

    def delete(self, sha256: str) -> None: ...

    def remove_partial_uploads(self, older_than_seconds: float) -> int:
        """Delete what uploads that never finished left behind, once untouched that long; returns how many."""
        ...

    def all_blobs(self) -> Iterable[tuple[str, float]]:
        """(sha256, modification time) of every stored blob, for garbage collection."""
        ...


# A partial upload in `tmp/` untouched this long belongs to a writer that is gone (an upload in progress writes to
# its file continuously): removed when a store opens and by `Registry.collect_garbage`.
PARTIAL_GRACE_SECONDS = 3600.0


def remove_stale_files(folder: Path, older_than_seconds: float) -> int:
    """Delete the files of `folder` untouched for `older_than_seconds` -> how many."""
    removed = 0
    for path in folder.iterdir():
        try:
            if time.time() - path.stat().st_mtime > older_than_seconds:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # finished (renamed) or removed meanwhile
            continue
    return removed


class LocalBlobStore:
    """Blobs as files `root/ab/cdef...` (sha256 split after two hex digits to keep directories small); uploads are
    written in `root/tmp` first."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.remove_partial_uploads()
        # Blobs already hashed since their file last changed: (inode, size, mtime) -> sha256. A file rewritten in
        # place changes its mtime, so a corrupted blob is hashed (and caught) again.
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()

    def _path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:]

    def put(
        self, stream: BinaryIO, expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> tuple[str, int]:
        with spooled_upload(stream, self.root / "tmp", expected_sha256, max_bytes, durable=True) as (
            tmp_name,
            sha,
            size,
        ):
            final = self._path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp_name, final)  # atomic: the blob appears whole or not at all
            _fsync_dir(final.parent)
            stat = final.stat()
            with self._lock:
                self._verified[sha] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            return sha, size

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def verified_path(self, sha256: str) -> Path:
        path = self._path(sha256)
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise BlobError(f"blob {sha256} is missing from the blob store") from exc
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._verified.get(sha256) == key:
                return path
        if hash_file(path) != sha256:
            raise CorruptBlobError(f"blob {sha256} is corrupted (its content no longer matches its sha256)")
        with self._lock:
            self._verified[sha256] = key
        return path

    def delete(self, sha256: str) -> None:
        with self._lock:
            self._verified.pop(sha256, None)
        self._path(sha256).unlink(missing_ok=True)

    def remove_partial_uploads(self, older_than_seconds: float = PARTIAL_GRACE_SECONDS) -> int:
        """Delete what crashed or killed uploads left in `tmp/` (untouched for `older_than_seconds`: another process
        sharing the store may be writing the newer ones); returns how many files."""
        return remove_stale_files(self.root / "tmp", older_than_seconds)

    def all_blobs(self) -> Iterable[tuple[str, float]]:
        for folder in self.root.iterdir():
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for file in folder.iterdir():
                sha = folder.name + file.name
                if SHA256.fullmatch(sha):
                    yield sha, file.stat().st_mtime


@contextmanager
def spooled_upload(
    stream: BinaryIO, directory: Path, expected_sha256: str | None, max_bytes: int | None, durable: bool
) -> Iterator[tuple[str, str, int]]:
    """Read `stream` into a new file in `directory`, hashing it on the way (synced to disk if `durable`), and yield
    (its path, its sha256, its size) once it is whole and matches `expected_sha256`; the file is removed after, unless
    the caller moved it. ValueError past `max_bytes` or on another digest."""
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix="upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ValueError(f"upload is larger than the limit of {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        sha = digest.hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise ValueError(f"upload's sha256 is {sha}, expected {expected_sha256}: the data changed in transit")
        yield tmp_name, sha, size
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
