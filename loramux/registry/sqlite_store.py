"""The metadata store in one SQLite file (WAL mode: readers never wait for the one writer)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramux.registry.sql_store import SQLStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces (
    namespace TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,
    revoked_at REAL);
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL, name TEXT NOT NULL,
    private INTEGER NOT NULL, created_at REAL NOT NULL, UNIQUE (namespace, name));
CREATE TABLE IF NOT EXISTS revisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, commit_id TEXT NOT NULL UNIQUE,
    repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE, parent TEXT, message TEXT NOT NULL,
    kind TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS revisions_repo ON revisions (repo_id, seq);
CREATE TABLE IF NOT EXISTS refs (
    repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE, branch TEXT NOT NULL,
    commit_id TEXT NOT NULL, PRIMARY KEY (repo_id, branch));
CREATE TABLE IF NOT EXISTS files (
    commit_id TEXT NOT NULL REFERENCES revisions(commit_id) ON DELETE CASCADE, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (commit_id, path));
CREATE INDEX IF NOT EXISTS files_blob ON files (sha256);
CREATE TABLE IF NOT EXISTS uploads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, examples INTEGER NOT NULL,
    created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS uploads_blob ON uploads (sha256);
CREATE TABLE IF NOT EXISTS ft_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT, model TEXT NOT NULL, base TEXT,
    training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, repo_id TEXT NOT NULL, settings TEXT NOT NULL,
    hyperparameters TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, fine_tuned_model TEXT, result_commit TEXT, error TEXT, trained_tokens INTEGER,
    attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL, worker TEXT, lease_expires_at REAL);
CREATE INDEX IF NOT EXISTS ft_jobs_status ON ft_jobs (status, seq);
CREATE TABLE IF NOT EXISTS ft_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES ft_jobs(id) ON DELETE CASCADE, created_at REAL NOT NULL, level TEXT NOT NULL,
    type TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS ft_events_job ON ft_events (job_id, seq);
"""


class SQLiteStore(SQLStore):
    """`MetadataStore` on SQLite: one connection per thread, writes in `BEGIN IMMEDIATE` transactions (the
    database's write lock, taken at the start: the rows a transaction reads are the ones it changes)."""

    DUPLICATE = sqlite3.IntegrityError

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)

    @contextmanager
    def blob_lock(self, exclusive: bool) -> Iterator[None]:
        # An flock on a file beside the database: shared or exclusive between the processes (and, each taking it
        # through its own open file, the threads) of this machine, released by the kernel if its holder dies.
        fd = os.open(f"{self.path}.blob-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, so reads inside see what the write will change
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _rows(self, sql: str, *args) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()
