"""The registry facade: tenants and keys, access rules, immutable revisions, concurrent pushes, rm and GC; each on
both deployments (SQLite + local blobs, PostgreSQL + S3) where the store takes part."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import pytest

from loramux.core.adapter_config import AdapterConfigError
from loramux.core.adapter_source import AdapterNotFoundError, AdapterRef
from loramux.registry.names import InvalidNameError, check_file_path
from loramux.registry.registry import (
    AddFile,
    Caller,
    CommitError,
    DeleteFile,
    Forbidden,
    Registry,
    RepoNotFoundError,
    RevisionNotFoundError,
    Unauthorized,
)
from loramux.registry.source import RegistrySource

LOCAL = Caller(local=True)


def add_dir(registry: Registry, directory) -> list[AddFile]:
    ops = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        with open(path, "rb") as f:
            sha, size = registry.store_blob(f)
        ops.append(AddFile(path.name, sha, size))
    return ops


def add_bytes(registry: Registry, path: str, data: bytes) -> AddFile:
    sha, size = registry.store_blob(io.BytesIO(data))
    return AddFile(path, sha, size)


def stored_keys(storage, data_dir) -> str:
    """Everything the store holds about API keys, as text."""
    if storage.kind == "local":  # the database file and its write-ahead log
        return b"".join(p.read_bytes() for p in data_dir.glob("registry.sqlite3*")).decode("latin-1")
    import psycopg

    with psycopg.connect(storage.database_url) as conn:
        return repr(conn.execute("SELECT * FROM api_keys").fetchall())


def test_keys_authenticate_to_their_tenant_until_revoked(storage, tmp_path):
    registry = storage.open(tmp_path)
    assert registry.caller(None) == LOCAL  # no keys: single-user mode
    registry.create_tenant("acme")
    key, token = registry.create_key("acme")
    stored = stored_keys(storage, tmp_path)
    assert key.key_id in stored and token not in stored  # stored hashed
    assert registry.authenticate(token) == "acme"
    assert registry.caller(token) == Caller(tenant="acme")
    assert registry.caller(None) == Caller()  # keys exist: anonymous
    with pytest.raises(Unauthorized):
        registry.caller("lmx_wrong")
    registry.revoke_key(key.key_id)
    assert registry.authenticate(token) is None
    with pytest.raises(Unauthorized):
        registry.caller(token)
    # The last key revoked: the registry stays locked, it does not fall back to single-user mode.
    assert registry.caller(None) == Caller()
    with pytest.raises(ValueError, match="no tenant"):
        registry.create_key("nobody")


def test_private_repos_look_missing_to_others_and_writes_stay_in_namespace(storage, tmp_path, make_adapter):
    registry = storage.open(tmp_path)
    for name in ("acme", "globex"):
        registry.create_tenant(name)
    acme = Caller(tenant=registry.authenticate(registry.create_key("acme")[1]))
    globex = Caller(tenant="globex")
    registry.create_repo("acme/secret", acme, private=True)
    registry.commit("acme/secret", acme, add_dir(registry, make_adapter()), "first")
    registry.create_repo("acme/open", acme)
    registry.commit("acme/open", acme, add_dir(registry, make_adapter()), "first")

    for who in (globex, Caller()):
        with pytest.raises(RepoNotFoundError, match="not found") as missing:
            registry.repo("acme/secret", who)
        with pytest.raises(RepoNotFoundError) as absent:
            registry.repo("acme/nothing", who)
        assert str(missing.value).replace("secret", "X") == str(absent.value).replace("nothing", "X")
        assert [v.repo.repo_id for v in registry.list_repos(who)] == ["acme/open"]
    assert [v.repo.repo_id for v in registry.list_repos(acme)] == ["acme/open", "acme/secret"]
    with pytest.raises(Forbidden):
        registry.commit("acme/open", globex, add_dir(registry, make_adapter()), "hijack")
    with pytest.raises(Forbidden):
        registry.create_repo("acme/new", globex)
    with pytest.raises(Unauthorized):
        registry.create_repo("globex/new", Caller())
    registry.add_namespace("globex", "shared")
    registry.create_repo("shared/x", globex)


def test_concurrent_pushes_all_become_revisions(storage, tmp_path, make_adapter):
    registry = storage.open(tmp_path)
    registry.create_repo("me/a", LOCAL)
    ops = add_dir(registry, make_adapter())
    results, errors = [], []

    def push(i: int) -> None:
        try:
            note = add_bytes(registry, "note.txt", f"push {i}".encode())
            results.append(registry.commit("me/a", LOCAL, [*ops, note], f"push {i}"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    repo = registry.repo("me/a", LOCAL)
    history = registry.store.list_revisions(repo)
    assert len(history) == 8 and len({r.commit for r in history}) == 8
    # a linear history: each revision's parent is the one before it
    assert [r.parent for r in history[:-1]] == [r.commit for r in history[1:]] and history[-1].parent is None
    assert registry.revision(repo, None).commit == history[0].commit


def test_an_invalid_commit_leaves_no_revision(storage, tmp_path, make_adapter):
    registry = storage.open(tmp_path)
    registry.create_repo("me/a", LOCAL)
    ops = add_dir(registry, make_adapter())
    config = json.loads((make_adapter() / "adapter_config.json").read_text())
    bad = add_bytes(registry, "adapter_config.json", json.dumps({**config, "r": 16}).encode())
    with pytest.raises(AdapterConfigError, match="do not match rank 16"):
        registry.commit("me/a", LOCAL, [op for op in ops if op.path != "adapter_config.json"] + [bad], "bad")
    with pytest.raises(CommitError, match="never|missing"):
        registry.commit("me/a", LOCAL, [*ops, AddFile("extra.txt", "ab" * 32, 3)], "missing upload")
    repo = registry.repo("me/a", LOCAL)
    assert registry.store.list_revisions(repo) == []
    with pytest.raises(RevisionNotFoundError):
        registry.revision(repo, None)
    first = registry.commit("me/a", LOCAL, ops, "good")
    with pytest.raises(CommitError, match="holds an adapter"):
        registry.commit("me/a", LOCAL, [DeleteFile("adapter_config.json")], "drop the config")
    assert registry.revision(repo, None).commit == first.commit


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", ".git/config", "a\\b", "dir/./f", ""])
def test_file_paths_that_escape_are_refused(path):
    with pytest.raises(InvalidNameError):
        check_file_path(path)


@pytest.mark.parametrize("repo_id", ["../x", "a/b/c", "a/..", "-a/b", "a/b c", "a/.hidden", "noslash"])
def test_repo_names_that_escape_are_refused(tmp_path, repo_id):
    with pytest.raises(InvalidNameError):
        Registry.open(tmp_path).create_repo(repo_id, LOCAL)


def test_rm_removes_the_repo_and_unshared_blobs(storage, tmp_path, make_adapter):
    registry = storage.open(tmp_path)
    for name in ("me/a", "me/b"):
        registry.create_repo(name, LOCAL)
    shared = add_dir(registry, make_adapter())
    only_a = add_bytes(registry, "README.md", b"only in a")
    registry.commit("me/a", LOCAL, [*shared, only_a], "a")
    registry.commit("me/b", LOCAL, shared, "b")
    orphan = add_bytes(registry, "x", b"uploaded, never committed")

    assert registry.delete_repo("me/a", LOCAL) == 1
    assert not registry.blobs.exists(only_a.sha256)
    assert all(registry.blobs.exists(op.sha256) for op in shared)  # still used by me/b
    with pytest.raises(RepoNotFoundError):
        registry.repo("me/a", LOCAL)
    assert registry.collect_garbage(grace_seconds=3600) == 0  # a push in progress keeps its uploads
    assert registry.collect_garbage(grace_seconds=-1) == 1
    assert not registry.blobs.exists(orphan.sha256)


def test_registry_source_resolves_the_newest_revision(storage, tmp_path, make_adapter):
    registry = storage.open(tmp_path / "data")
    source = RegistrySource(registry, tmp_path / "cache")
    registry.create_repo("me/a", LOCAL, private=True)
    first = registry.commit("me/a", LOCAL, add_dir(registry, make_adapter(r=4)), "r4")
    resolved = source.resolve(AdapterRef.parse("me/a"), None)
    assert resolved.commit == first.commit
    assert json.loads((resolved.path / "adapter_config.json").read_text())["r"] == 4

    second = registry.commit("me/a", LOCAL, add_dir(registry, make_adapter(r=8)), "r8")
    newest = source.resolve(AdapterRef.parse("me/a"), None)
    assert newest.commit == second.commit and newest.path != resolved.path
    assert json.loads((newest.path / "adapter_config.json").read_text())["r"] == 8
    assert source.resolve(AdapterRef.parse(f"me/a@{first.commit}"), None).path == resolved.path

    registry.create_tenant("acme")
    registry.create_key("acme")  # keys exist now: me/a is private and belongs to no tenant of acme's
    for ref in ("me/a", "me/missing", f"me/a@{'0' * 40}"):
        with pytest.raises(AdapterNotFoundError):
            source.resolve(AdapterRef.parse(ref), "acme")


def test_storage_urls_that_name_no_supported_store_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must start with postgresql://, not 'mysql'"):
        Registry.open(tmp_path, database_url="mysql://root:secret@db/registry")  # the password is never echoed
    with pytest.raises(ValueError, match=r"must be s3://BUCKET\[/PREFIX\]"):
        Registry.open(tmp_path, blob_url="gs://bucket/prefix")
    result = subprocess.run([sys.executable, "-m", "loramux.cli", "tenants", "list", "--data-dir", str(tmp_path)],
                            env={**os.environ, "LORAMUX_BLOB_URL": "/var/blobs"}, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 1
    expected = "loramux tenants: error: the blob URL must be s3://BUCKET[/PREFIX], not '/var/blobs'"
    assert result.stderr.strip() == expected


def test_a_missing_driver_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "loramux.registry.postgres_store", None)  # as if psycopg were not installed
    monkeypatch.setitem(sys.modules, "loramux.registry.s3_blobs", None)  # as if boto3 were not installed
    with pytest.raises(
        ValueError, match=r"PostgreSQL registry needs the cluster extra: pip install 'loramux\[cluster\]'"
    ):
        Registry.open(tmp_path, database_url="postgresql://db/registry")
    with pytest.raises(ValueError, match=r"blobs on S3 needs the cluster extra"):
        Registry.open(tmp_path, blob_url="s3://bucket/prefix")


def test_a_revision_is_named_by_any_unique_prefix_of_7_or_more_digits(tmp_path, make_adapter, monkeypatch):
    import loramux.registry.registry as registry_module

    registry = Registry.open(tmp_path / "data")
    source = RegistrySource(registry, tmp_path / "cache")
    registry.create_repo("me/a", LOCAL)
    ids = iter(["abc12340" + "0" * 32, "abc12341" + "1" * 32, "fed" + "2" * 37])  # two share their first 7 digits
    monkeypatch.setattr(registry_module, "_commit_id", lambda *args: next(ids))
    first, second, third = (
        registry.commit("me/a", LOCAL, add_dir(registry, make_adapter(r=r)), f"r{r}") for r in (4, 8, 2)
    )
    repo = registry.repo("me/a", LOCAL)
    assert registry.revision(repo, "abc12340").commit == first.commit
    assert registry.revision(repo, "ABC12341" + "1" * 4).commit == second.commit  # any case, any length from 7
    assert registry.revision(repo, "fed2222").commit == third.commit
    assert registry.revision(repo, third.commit).commit == third.commit
    resolved = source.resolve(AdapterRef.parse("me/a@abc12340"), None)  # how requests name it: ns/name@id
    assert resolved.commit == first.commit  # the full id: caches key by it
    assert json.loads((resolved.path / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(RevisionNotFoundError, match="ambiguous.*2 commits start with it"):
        registry.revision(repo, "abc1234")
    for unknown in ("abc1239", "fed222", "main2"):  # no such commit; 6 digits are too few; not a branch
        with pytest.raises(RevisionNotFoundError, match="7 or more of its first hex digits"):
            registry.revision(repo, unknown)


def test_every_process_on_a_data_directory_signs_uploads_with_one_key(tmp_path, monkeypatch):
    """A client may get an upload URL (or a Xet token) from one process and send the file to another: several API
    processes on one port, several hubs on one registry. They share the data directory's key, or $LORAMUX_HUB_SECRET."""
    from loramux.registry.http import UploadSigner
    from loramux.registry.hub_secret import SECRET_ENV

    monkeypatch.delenv(SECRET_ENV, raising=False)
    first, second = Registry.open(tmp_path / "data"), Registry.open(tmp_path / "data")
    assert first.secret == second.secret and len(first.secret) == 32
    assert (tmp_path / "data" / "hub.key").stat().st_mode & 0o077 == 0  # its owner's only
    expires, sig = UploadSigner(first.secret).sign("a" * 64, 10)
    assert UploadSigner(second.secret).check("a" * 64, 10, expires, sig)
    assert Registry.open(tmp_path / "other").secret != first.secret
    monkeypatch.setenv(SECRET_ENV, "shared by every host")
    shared = b"shared by every host"
    assert Registry.open(tmp_path / "data").secret == Registry.open(tmp_path / "other").secret == shared
