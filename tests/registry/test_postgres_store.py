"""The metadata store on a real PostgreSQL: its schema comes from the migrations and is checked at start, commits
survive the database restarting under them whole or not at all, and the blob lock holds across processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest

from loramux.registry import migrations
from loramux.registry.postgres_connections import SCHEMA_REVISIONS
from loramux.registry.postgres_store import PostgresStore
from loramux.registry.registry import Caller
from loramux.registry.store import StorageUnavailableError
from tests.registry.test_registry import add_bytes, add_dir

LOCAL = Caller(local=True)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


@pytest.fixture
def empty_database(postgres_cluster):
    postgres_cluster.execute("CREATE DATABASE empty_registry")
    yield postgres_cluster.url("empty_registry")
    postgres_cluster.execute("DROP DATABASE empty_registry WITH (FORCE)")


def test_the_schema_comes_from_loramux_db_upgrade_and_is_checked_at_start(empty_database, tmp_path):
    assert SCHEMA_REVISIONS[-1] == migrations.head()  # the store knows the newest migration
    with pytest.raises(ValueError, match="no loramux tables yet.*loramux db upgrade"):
        PostgresStore(empty_database)
    refused = run_cli("tenants", "list", "--database-url", empty_database, "--data-dir", str(tmp_path))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "run `loramux db upgrade`" in refused.stderr

    upgraded = run_cli("db", "upgrade", "--database-url", empty_database)
    assert upgraded.returncode == 0, upgraded.stderr
    assert run_cli("db", "upgrade", "--database-url", empty_database).returncode == 0  # again: nothing to do
    current = run_cli("db", "current", "--database-url", empty_database)
    assert current.stdout.strip() == f"database: {SCHEMA_REVISIONS[-1]}; this loramux: {SCHEMA_REVISIONS[-1]}"
    created = run_cli("tenants", "create", "acme", "--database-url", empty_database, "--data-dir", str(tmp_path))
    assert created.returncode == 0, created.stderr
    store = PostgresStore(empty_database)
    try:
        assert [t.name for t in store.list_tenants()] == ["acme"]
    finally:
        store.close()

    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(ValueError, match="newer than this loramux knows"):
        PostgresStore(empty_database)


def test_an_unreachable_database_is_one_clear_line(tmp_path):
    from tests.conftest import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(StorageUnavailableError, match="cannot connect to the registry database"):
        PostgresStore(url, timeout=2)
    result = run_cli("hub", "--database-url", url, "--data-dir", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loramux hub: error: cannot connect to the registry database")


def test_the_database_restarting_mid_commit_leaves_no_partial_revision(
    shared_storage, postgres_cluster, make_adapter, tmp_path, monkeypatch
):
    registry = shared_storage.open(tmp_path / "data")
    registry.create_repo("me/a", LOCAL)
    adapter = add_dir(registry, make_adapter())
    first = registry.commit("me/a", LOCAL, adapter, "first")
    note = add_bytes(registry, "note.txt", b"written while the database went down")

    real_executemany = psycopg.Cursor.executemany

    def executemany_then_restart(cursor, query, params, *args, **kwargs):
        result = real_executemany(cursor, query, params, *args, **kwargs)
        if "INSERT INTO files" in str(query):  # the revision and its files are written, the ref not yet
            postgres_cluster.restart()
        return result

    monkeypatch.setattr(psycopg.Cursor, "executemany", executemany_then_restart)
    with pytest.raises(StorageUnavailableError, match="database is unavailable"):
        registry.commit("me/a", LOCAL, [*adapter, note], "second")
    monkeypatch.setattr(psycopg.Cursor, "executemany", real_executemany)

    # Once the database is back, the same registry (its pool replaces the broken connections) shows what was
    # committed before, and nothing of the interrupted commit.
    repo = registry.repo("me/a", LOCAL)
    assert [r.commit for r in registry.store.list_revisions(repo)] == [first.commit]
    assert registry.revision(repo, None).commit == first.commit
    with psycopg.connect(shared_storage.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM revisions").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM files WHERE path = 'note.txt'").fetchone()[0] == 0
    second = registry.commit("me/a", LOCAL, [*adapter, note], "second")  # and a retry goes through whole
    assert second.parent == first.commit
    assert {e.path for e in registry.files(second)} == {op.path for op in adapter} | {"note.txt"}


def test_blob_deletion_waits_for_commits_of_every_process(shared_storage, tmp_path):
    one, two = shared_storage.open(tmp_path / "one"), shared_storage.open(tmp_path / "two")  # two processes' views
    deleted = threading.Event()

    def delete() -> None:
        with two.holding_blobs(exclusive=True):
            deleted.set()

    with one.holding_blobs(exclusive=False):  # a commit of the first process checks its blobs
        deleter = threading.Thread(target=delete)
        deleter.start()
        waiting_locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        with psycopg.connect(shared_storage.database_url, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while conn.execute(waiting_locks).fetchone()[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert conn.execute(waiting_locks).fetchone()[0] == 1  # the second process's deletion waits for it
        assert not deleted.is_set()
    deleter.join(timeout=60)
    assert deleted.is_set()
