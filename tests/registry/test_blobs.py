"""The content-addressed blob store: whole blobs or nothing, and corruption caught before serving."""

from __future__ import annotations

import hashlib
import io

import pytest

from loramux.registry.blobs import BlobError, CorruptBlobError, LocalBlobStore


def test_put_is_addressed_by_sha256_and_verified(tmp_path):
    store = LocalBlobStore(tmp_path)
    data = b"lora" * 1000
    sha, size = store.put(io.BytesIO(data))
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert store.verified_path(sha).read_bytes() == data
    assert [sha for sha, _ in store.all_blobs()] == [sha]
    assert not any((tmp_path / "tmp").iterdir())


def test_a_wrong_expected_hash_stores_nothing(tmp_path):
    store = LocalBlobStore(tmp_path)
    with pytest.raises(ValueError, match="changed in transit"):
        store.put(io.BytesIO(b"abc"), expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="limit"):
        store.put(io.BytesIO(b"abcdef"), max_bytes=3)
    assert list(store.all_blobs()) == []
    assert not any((tmp_path / "tmp").iterdir())


def test_a_corrupted_blob_is_detected(tmp_path):
    store = LocalBlobStore(tmp_path)
    sha, _ = store.put(io.BytesIO(b"x" * 4096))
    path = store.verified_path(sha)
    path.write_bytes(b"y" + path.read_bytes()[1:])
    with pytest.raises(CorruptBlobError):
        store.verified_path(sha)
    store.delete(sha)
    with pytest.raises(BlobError, match="missing"):
        store.verified_path(sha)


def test_names_that_are_not_hashes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a sha256"):
        LocalBlobStore(tmp_path).verified_path("../../etc/passwd")


def test_partial_uploads_of_dead_writers_are_removed(tmp_path):
    """A killed upload leaves its temporary file in tmp/: an old one goes when a store opens and with each garbage
    collection; a recent one may be an upload in progress in another process, and stays."""
    import os
    import time

    from loramux.registry.registry import Registry, collect_garbage_periodically

    (tmp_path / "blobs" / "tmp").mkdir(parents=True)
    old, fresh = tmp_path / "blobs" / "tmp" / "upload-old", tmp_path / "blobs" / "tmp" / "upload-fresh"
    for path in (old, fresh):
        path.write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    registry = Registry.open(tmp_path)  # opening the store
    assert not old.exists() and fresh.exists()

    os.utime(fresh, (two_hours_ago, two_hours_ago))
    assert registry.collect_garbage() == 1 and not fresh.exists()

    late = tmp_path / "blobs" / "tmp" / "upload-late"
    late.write_bytes(b"y")
    os.utime(late, (two_hours_ago, two_hours_ago))
    stop = collect_garbage_periodically(registry, every_seconds=0.05)  # what `loramux serve` and `hub` run
    try:
        deadline = time.monotonic() + 10
        while late.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not late.exists()
    finally:
        stop.set()
