"""The registry source's directories per commit: concurrent resolvers of one commit share one published directory, its
files are hard links to the blob store's (copies where links are refused), each blob is hashed once on its first
resolve, and a blob damaged on disk is refused."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from loramux.core.adapter_source import AdapterRef
from loramux.registry import blobs as blobs_module
from loramux.registry import source as source_module
from loramux.registry.blobs import CorruptBlobError
from loramux.registry.registry import Caller, Registry
from loramux.registry.source import RegistrySource
from tests.registry.test_registry import add_dir

LOCAL = Caller(local=True)


def test_concurrent_resolves_of_one_commit_never_remove_a_copy_a_reader_holds(
    storage, tmp_path, make_adapter, monkeypatch
):
    registry = storage.open(tmp_path / "data")
    source = RegistrySource(registry, tmp_path / "cache")
    registry.create_repo("me/a", LOCAL, private=True)
    registry.commit("me/a", LOCAL, add_dir(registry, make_adapter(r=4)), "r4")

    place = source_module._place

    def slow_place(src, dst):  # every resolver finds the commit missing and lays it out
        time.sleep(0.2)
        return place(src, dst)

    monkeypatch.setattr(source_module, "_place", slow_place)
    start, resolved, seen, errors = threading.Barrier(4, timeout=10), threading.Barrier(4, timeout=10), {}, []

    def resolve(i: int) -> None:
        try:
            start.wait()
            directory = source.resolve(AdapterRef.parse("me/a"), None).path
            seen[i] = (directory, directory.stat().st_ino)  # the directory this reader opens
            resolved.wait()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # every reader got the one directory that stays: none was removed under a reader, no temporary one is left over
    assert len({inode for _, inode in seen.values()}) == 1
    directory, inode = seen[0]
    assert directory.stat().st_ino == inode and (directory / "adapter_model.safetensors").is_file()
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]


def test_a_commit_s_files_are_links_to_the_blob_store_with_the_same_bytes(tmp_path, make_adapter):
    registry = Registry.open(tmp_path / "data")
    registry.create_repo("me/a", LOCAL, private=True)
    adapter = make_adapter(r=4)
    registry.commit("me/a", LOCAL, add_dir(registry, adapter), "r4")
    resolved = RegistrySource(Registry.open(tmp_path / "data"), tmp_path / "cache").resolve(
        AdapterRef.parse("me/a"), None
    )
    revision = registry.revision(registry.repo("me/a", LOCAL), "main")
    for entry in registry.files(revision):
        placed = resolved.path / entry.path
        assert os.path.samefile(placed, registry.blob_path(entry))  # no second copy of the bytes on disk
        assert placed.read_bytes() == (adapter / entry.path).read_bytes()


def test_where_links_are_refused_the_files_are_copied(tmp_path, make_adapter, monkeypatch):
    registry = Registry.open(tmp_path / "data")
    registry.create_repo("me/a", LOCAL, private=True)
    adapter = make_adapter(r=4)
    registry.commit("me/a", LOCAL, add_dir(registry, adapter), "r4")

    def refuse(src, dst, *args, **kwargs):  # as across devices
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(source_module.os, "link", refuse)
    resolved = RegistrySource(Registry.open(tmp_path / "data"), tmp_path / "cache").resolve(
        AdapterRef.parse("me/a"), None
    )
    weights = resolved.path / "adapter_model.safetensors"
    revision = registry.revision(registry.repo("me/a", LOCAL), "main")
    blob = registry.blob_path(next(e for e in registry.files(revision) if e.path == weights.name))
    assert not os.path.samefile(weights, blob)
    assert weights.read_bytes() == (adapter / weights.name).read_bytes()


def test_a_first_resolve_hashes_each_blob_once(storage, tmp_path, make_adapter, monkeypatch):
    """The blob store checks a blob against its sha256 before handing it out (once per process): the copy made from
    it for the engine is not hashed a second time."""
    registry = storage.open(tmp_path / "data")
    registry.create_repo("me/a", LOCAL, private=True)
    registry.commit("me/a", LOCAL, add_dir(registry, make_adapter(r=4)), "r4")
    fresh = storage.open(tmp_path / "data")  # another process's view: nothing verified yet
    source = RegistrySource(fresh, tmp_path / "cache")
    hashed = []
    for module in blob_modules():
        real_hash = module.hash_file
        monkeypatch.setattr(
            module, "hash_file", lambda path, real_hash=real_hash: hashed.append(path) or real_hash(path)
        )
    monkeypatch.setattr(source_module, "_digest", lambda *a: pytest.fail("a verified blob's copy was hashed again"))
    resolved = source.resolve(AdapterRef.parse("me/a"), None)
    files = sorted(p.name for p in resolved.path.iterdir() if p.name != source_module.COMPLETE)
    assert "adapter_model.safetensors" in files and len(hashed) == len(files)  # one hash per blob, none of a copy


def test_a_blob_damaged_on_disk_is_refused_and_nothing_is_published(tmp_path, make_adapter):
    registry = Registry.open(tmp_path / "data")
    registry.create_repo("me/b", LOCAL, private=True)
    registry.commit("me/b", LOCAL, add_dir(registry, make_adapter(r=8)), "r8")
    revision = registry.revision(registry.repo("me/b", LOCAL), "main")
    weights = next(e for e in registry.files(revision) if e.path == "adapter_model.safetensors")
    blob = registry.blob_path(weights)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    fresh = Registry.open(tmp_path / "data")
    with pytest.raises(CorruptBlobError):
        RegistrySource(fresh, tmp_path / "cache").resolve(AdapterRef.parse("me/b"), None)
    assert not list((tmp_path / "cache").rglob("adapter_model.safetensors"))


def blob_modules() -> list:
    """The blob store modules that hash blobs (the S3 one where its extra is installed)."""
    try:
        from loramux.registry import s3_blobs
    except ImportError:
        return [blobs_module]
    return [blobs_module, s3_blobs]
