"""The registry source's copies out of the blob store: concurrent resolvers of one commit share one published copy."""

from __future__ import annotations

import shutil
import threading
import time

from loramux.core.adapter_source import AdapterRef
from loramux.registry import source as source_module
from loramux.registry.registry import Caller
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

    copy = shutil.copyfile

    def slow_copy(src, dst, *args, **kwargs):  # every resolver finds the commit missing and copies it
        time.sleep(0.2)
        return copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(source_module.shutil, "copyfile", slow_copy)
    start, resolved, seen, errors = threading.Barrier(4, timeout=10), threading.Barrier(4, timeout=10), {}, []

    def resolve(i: int) -> None:
        try:
            start.wait()
            path = source.resolve(AdapterRef.parse("me/a"), None).path / "adapter_model.safetensors"
            seen[i] = (path, path.stat().st_ino)  # the copy this reader opens
            resolved.wait()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # every reader got the one copy that stays: none was removed under a reader, no temporary copy is left over
    assert len({inode for _, inode in seen.values()}) == 1
    path, inode = seen[0]
    assert path.stat().st_ino == inode
    assert [p.name for p in path.parent.parent.iterdir()] == [path.parent.name]
