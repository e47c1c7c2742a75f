"""The blob store on a real S3-compatible server: whole objects or nothing, corruption caught before serving (in the
bucket and in the local cache), one prefix per registry, and a clear error when the bucket cannot be reached."""

from __future__ import annotations

import hashlib
import io

import boto3
import pytest

from loramux.registry.blobs import BlobError, CorruptBlobError
from loramux.registry.s3_blobs import S3BlobStore, parse_blob_url
from loramux.registry.store import StorageUnavailableError


@pytest.fixture
def bucket(shared_storage):
    """(blob URL, a plain boto3 client on the same server) for a fresh prefix."""
    client = boto3.client("s3", endpoint_url=shared_storage.aws_env["AWS_ENDPOINT_URL_S3"])
    return shared_storage.blob_url, client


def keys(client, url: str) -> list[str]:
    name, prefix = parse_blob_url(url)
    return [o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", [])]


def test_put_is_addressed_by_sha256_and_read_through_a_verified_cache(bucket, tmp_path):
    url, client = bucket
    store = S3BlobStore(url, tmp_path / "cache")
    data = b"lora" * 300_000  # 1.2 MB: one PUT (the next test's blob goes up in parts)
    sha, size = store.put(io.BytesIO(data))
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    name, prefix = parse_blob_url(url)
    assert keys(client, url) == [f"{prefix}{sha[:2]}/{sha[2:]}"]
    assert client.get_object(Bucket=name, Key=keys(client, url)[0])["Body"].read() == data
    assert store.exists(sha) and not store.exists("0" * 64)
    assert [s for s, _ in store.all_blobs()] == [sha]

    elsewhere = S3BlobStore(url, tmp_path / "other-machine")  # another process: downloads, checks, caches
    assert elsewhere.verified_path(sha).read_bytes() == data
    assert list((tmp_path / "other-machine" / "tmp").iterdir()) == []
    store.delete(sha)
    assert keys(client, url) == [] and not store.exists(sha)
    with pytest.raises(BlobError, match="missing"):
        S3BlobStore(url, tmp_path / "third").verified_path(sha)


def test_a_large_blob_goes_up_in_parts_and_comes_back_whole(bucket, tmp_path):
    url, _ = bucket
    data = bytes(range(256)) * (40 * 1024 * 4)  # 40 MiB: a multipart upload
    sha, _ = S3BlobStore(url, tmp_path / "a").put(io.BytesIO(data))
    assert S3BlobStore(url, tmp_path / "b").verified_path(sha).read_bytes() == data


def test_a_wrong_expected_hash_or_size_stores_nothing(bucket, tmp_path):
    url, client = bucket
    store = S3BlobStore(url, tmp_path / "cache")
    with pytest.raises(ValueError, match="changed in transit"):
        store.put(io.BytesIO(b"abc"), expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="limit"):
        store.put(io.BytesIO(b"abcdef"), max_bytes=3)
    assert keys(client, url) == [] and list(store.all_blobs()) == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_corrupted_object_is_never_served_and_a_damaged_cached_copy_is_fetched_again(bucket, tmp_path):
    url, client = bucket
    store = S3BlobStore(url, tmp_path / "cache")
    data = b"x" * 4096
    sha, _ = store.put(io.BytesIO(data))
    cached = store.verified_path(sha)
    cached.write_bytes(b"y" + data[1:])  # the local copy damaged: the bucket still has the original
    assert store.verified_path(sha).read_bytes() == data

    name, _ = parse_blob_url(url)
    client.put_object(Bucket=name, Key=keys(client, url)[0], Body=b"y" + data[1:])  # now the bucket's copy
    with pytest.raises(CorruptBlobError):
        S3BlobStore(url, tmp_path / "fresh").verified_path(sha)
    assert not (tmp_path / "fresh" / sha[:2] / sha[2:]).exists()


def test_each_registry_sees_only_its_own_prefix(bucket, tmp_path):
    url, _ = bucket
    mine, theirs = S3BlobStore(url, tmp_path / "a"), S3BlobStore(url + "-other", tmp_path / "b")
    sha, _ = mine.put(io.BytesIO(b"mine"))
    theirs.put(io.BytesIO(b"theirs"))
    assert [s for s, _ in mine.all_blobs()] == [sha]
    assert not theirs.exists(sha)


def test_names_that_are_not_hashes_are_refused(bucket, tmp_path):
    with pytest.raises(ValueError, match="not a sha256"):
        S3BlobStore(bucket[0], tmp_path).verified_path("../../etc/passwd")
    with pytest.raises(ValueError, match="s3://BUCKET"):
        parse_blob_url("http://bucket/prefix")


def test_an_unreachable_bucket_is_a_clear_error_and_stores_nothing(bucket, s3_server, tmp_path):
    url, client = bucket
    store = S3BlobStore(url, tmp_path / "cache")
    kept, _ = store.put(io.BytesIO(b"stored before"))
    store.verified_path(kept)
    s3_server.stop()
    try:
        with pytest.raises(StorageUnavailableError, match="cannot be reached"):
            store.put(io.BytesIO(b"while the bucket is away"))
        with pytest.raises(StorageUnavailableError):
            S3BlobStore(url, tmp_path / "other").verified_path(kept)
        with pytest.raises(StorageUnavailableError):
            S3BlobStore(url, tmp_path / "new")  # a process starting now says so at once
        assert store.verified_path(kept).read_bytes() == b"stored before"  # what is cached is still served
    finally:
        s3_server.start()
    assert [s for s, _ in store.all_blobs()] == [kept] and len(keys(client, url)) == 1  # nothing half-written
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
