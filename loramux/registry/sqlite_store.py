"""The metadata store in one SQLite file (WAL mode: readers never wait for the one writer)."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path
from typing import Any

from loramux.registry.rows import (
    check_job_fields,
    event_of,
    job_of,
    job_values,
    json_value,
    repo_of,
    revision_of,
    upload_of,
)
from loramux.registry.store import (
    CLAIMED,
    FAILED,
    QUEUED,
    VALIDATING,
    ApiKey,
    FileEntry,
    FineTuningJob,
    JobEvent,
    Repo,
    RepoExistsError,
    Revision,
    StaleHeadError,
    Tenant,
    UploadedFile,
)

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


class SQLiteStore:
    """`MetadataStore` on SQLite: one connection per thread, writes in `BEGIN IMMEDIATE` transactions."""

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

    # --- tenants and keys
    def create_tenant(self, name: str) -> Tenant:
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"tenant {name!r} already exists")
            owner = db.execute("SELECT tenant FROM namespaces WHERE namespace = ?", (name,)).fetchone()
            if owner:
                raise ValueError(f"namespace {name!r} already belongs to tenant {owner[0]!r}")
            db.execute("INSERT INTO tenants VALUES (?, ?)", (name, now))
            db.execute("INSERT INTO namespaces VALUES (?, ?)", (name, name))
        return Tenant(name, now)

    def list_tenants(self) -> list[Tenant]:
        return [Tenant(r["name"], r["created_at"]) for r in self._rows("SELECT * FROM tenants ORDER BY name")]

    def add_namespace(self, tenant: str, namespace: str) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone():
                raise ValueError(f"no tenant {tenant!r}")
            owner = db.execute("SELECT tenant FROM namespaces WHERE namespace = ?", (namespace,)).fetchone()
            if owner and owner[0] != tenant:
                raise ValueError(f"namespace {namespace!r} already belongs to tenant {owner[0]!r}")
            db.execute("INSERT OR IGNORE INTO namespaces VALUES (?, ?)", (namespace, tenant))

    def namespace_owner(self, namespace: str) -> str | None:
        rows = self._rows("SELECT tenant FROM namespaces WHERE namespace = ?", namespace)
        return rows[0]["tenant"] if rows else None

    def namespaces_of(self, tenant: str) -> list[str]:
        return [r[0] for r in self._rows("SELECT namespace FROM namespaces WHERE tenant = ? ORDER BY 1", tenant)]

    def add_key(self, key_id: str, tenant: str, token_hash: str, description: str) -> ApiKey:
        now = time.time()
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone():
                raise ValueError(f"no tenant {tenant!r}: create it first with `loramux tenants create {tenant}`")
            db.execute(
                "INSERT INTO api_keys (key_id, tenant, token_hash, description, created_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, tenant, token_hash, description, now),
            )
        return ApiKey(key_id, tenant, description, now)

    def tenant_for_token_hash(self, token_hash: str) -> str | None:
        rows = self._rows("SELECT tenant FROM api_keys WHERE token_hash = ? AND revoked_at IS NULL", token_hash)
        return rows[0]["tenant"] if rows else None

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
            return cur.rowcount == 1

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + (" WHERE tenant = ?" if tenant else "") + " ORDER BY created_at"
        rows = self._rows(sql, *([tenant] if tenant else []))
        return [ApiKey(r["key_id"], r["tenant"], r["description"], r["created_at"], r["revoked_at"]) for r in rows]

    def has_keys(self) -> bool:
        # Revoked keys count: revoking the last key must lock the registry, never reopen it to everyone.
        return bool(self._rows("SELECT 1 FROM api_keys LIMIT 1"))

    # --- repos
    def create_repo(self, namespace: str, name: str, private: bool) -> Repo:
        now = time.time()
        try:
            with self._write() as db:
                cur = db.execute(
                    "INSERT INTO repos (namespace, name, private, created_at) VALUES (?, ?, ?, ?)",
                    (namespace, name, int(private), now),
                )
        except sqlite3.IntegrityError as exc:
            raise RepoExistsError(f"repo {namespace}/{name} already exists") from exc
        return Repo(cur.lastrowid, namespace, name, private, now)

    def get_repo(self, namespace: str, name: str) -> Repo | None:
        rows = self._rows("SELECT * FROM repos WHERE namespace = ? AND name = ?", namespace, name)
        return repo_of(rows[0]) if rows else None

    def list_repos(self, namespace: str | None = None) -> list[Repo]:
        if namespace is None:
            return [repo_of(r) for r in self._rows("SELECT * FROM repos ORDER BY namespace, name")]
        return [repo_of(r) for r in self._rows("SELECT * FROM repos WHERE namespace = ? ORDER BY name", namespace)]

    def set_private(self, repo: Repo, private: bool) -> None:
        with self._write() as db:
            db.execute("UPDATE repos SET private = ? WHERE id = ?", (int(private), repo.id))

    def delete_repo(self, repo: Repo) -> set[str]:
        with self._write() as db:
            blobs = {
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT f.sha256 FROM files f JOIN revisions v ON v.commit_id = f.commit_id "
                    "WHERE v.repo_id = ?",
                    (repo.id,),
                )
            }
            db.execute("DELETE FROM repos WHERE id = ?", (repo.id,))  # cascades to refs, revisions, files
            still_used = {r[0] for r in db.execute("SELECT sha256 FROM files UNION SELECT sha256 FROM uploads")}
        return blobs - still_used

    # --- revisions
    def add_revision(self, revision: Revision, files: list[FileEntry], branch: str) -> None:
        with self._write() as db:
            row = db.execute(
                "SELECT commit_id FROM refs WHERE repo_id = ? AND branch = ?", (revision.repo, branch)
            ).fetchone()
            if (row[0] if row else None) != revision.parent:
                raise StaleHeadError(f"branch {branch} moved")
            if not db.execute("SELECT 1 FROM repos WHERE id = ?", (revision.repo,)).fetchone():
                raise LookupError("the repo was deleted during the push")
            db.execute(
                "INSERT INTO revisions (commit_id, repo_id, parent, message, kind, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (revision.commit, revision.repo, revision.parent, revision.message, revision.kind, revision.created_at),
            )
            db.executemany(
                "INSERT INTO files VALUES (?, ?, ?, ?)", [(revision.commit, f.path, f.sha256, f.size) for f in files]
            )
            db.execute(
                "INSERT INTO refs VALUES (?, ?, ?) "
                "ON CONFLICT (repo_id, branch) DO UPDATE SET commit_id = excluded.commit_id",
                (revision.repo, branch, revision.commit),
            )

    def head(self, repo: Repo, branch: str) -> Revision | None:
        rows = self._rows(
            "SELECT v.* FROM refs r JOIN revisions v ON v.commit_id = r.commit_id WHERE r.repo_id = ? AND r.branch = ?",
            repo.id,
            branch,
        )
        return revision_of(rows[0]) if rows else None

    def get_revision(self, repo: Repo, commit: str) -> Revision | None:
        rows = self._rows("SELECT * FROM revisions WHERE repo_id = ? AND commit_id = ?", repo.id, commit)
        return revision_of(rows[0]) if rows else None

    def list_revisions(self, repo: Repo) -> list[Revision]:
        rows = self._rows("SELECT * FROM revisions WHERE repo_id = ? ORDER BY seq DESC", repo.id)
        return [revision_of(r) for r in rows]

    def files(self, commit: str) -> list[FileEntry]:
        rows = self._rows("SELECT path, sha256, size FROM files WHERE commit_id = ? ORDER BY path", commit)
        return [FileEntry(r["path"], r["sha256"], r["size"]) for r in rows]

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT sha256 FROM files UNION SELECT sha256 FROM uploads")}

    # --- uploaded training files
    def add_upload(self, upload: UploadedFile) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO uploads (id, tenant, filename, purpose, sha256, bytes, examples, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                astuple(upload),
            )

    def get_upload(self, file_id: str) -> UploadedFile | None:
        rows = self._rows("SELECT * FROM uploads WHERE id = ?", file_id)
        return upload_of(rows[0]) if rows else None

    def list_uploads(self, tenant: str | None) -> list[UploadedFile]:
        if tenant is None:
            return [upload_of(r) for r in self._rows("SELECT * FROM uploads ORDER BY seq DESC")]
        return [upload_of(r) for r in self._rows("SELECT * FROM uploads WHERE tenant = ? ORDER BY seq DESC", tenant)]

    def delete_upload(self, file_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM uploads WHERE id = ?", (file_id,)).rowcount == 1

    # --- fine-tuning jobs: every state change is one conditional UPDATE inside a write transaction, so two workers
    # never both claim a job and a worker that lost its claim never overwrites what happened since.
    def add_job(self, job: FineTuningJob) -> None:
        row = job_values(job)
        with self._write() as db:
            db.execute(
                f"INSERT INTO ft_jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )

    def get_job(self, job_id: str) -> FineTuningJob | None:
        rows = self._rows("SELECT * FROM ft_jobs WHERE id = ?", job_id)
        return job_of(rows[0]) if rows else None

    def list_jobs(self, tenant: str | None, everyone: bool, after: str | None, limit: int) -> list[FineTuningJob]:
        where, args = ("1", []) if everyone else ("tenant IS ?", [tenant])
        if after is not None:
            where += " AND seq < COALESCE((SELECT seq FROM ft_jobs WHERE id = ?), -1)"
            args.append(after)
        rows = self._rows(f"SELECT * FROM ft_jobs WHERE {where} ORDER BY seq DESC LIMIT ?", *args, limit)
        return [job_of(r) for r in rows]

    def cancel_job(self, job_id: str, now: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                f"UPDATE ft_jobs SET status = 'cancelled', finished_at = ?, lease_expires_at = NULL "
                f"WHERE id = ? AND status IN ({_marks(3)})",
                (now, job_id, QUEUED, *CLAIMED),
            )
            return cur.rowcount == 1

    def expire_leases(self, now: float) -> list[tuple[FineTuningJob, str]]:
        changed = []
        with self._write() as db:
            rows = db.execute(
                f"SELECT * FROM ft_jobs WHERE status IN ({_marks(2)}) AND lease_expires_at < ?", (*CLAIMED, now)
            ).fetchall()
            for job in map(job_of, rows):
                if job.attempts >= job.max_attempts:
                    error = {
                        "code": "worker_lost",
                        "message": f"the training worker stopped answering on the last of {job.max_attempts} attempts",
                        "param": None,
                    }
                    db.execute(
                        "UPDATE ft_jobs SET status = ?, error = ?, finished_at = ?, worker = NULL, "
                        "lease_expires_at = NULL WHERE id = ?",
                        (FAILED, json.dumps(error), now, job.id),
                    )
                    changed.append((job, FAILED))
                else:
                    db.execute(
                        "UPDATE ft_jobs SET status = ?, worker = NULL, lease_expires_at = NULL WHERE id = ?",
                        (QUEUED, job.id),
                    )
                    changed.append((job, QUEUED))
        return changed

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> FineTuningJob | None:
        with self._write() as db:
            row = db.execute("SELECT id FROM ft_jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE ft_jobs SET status = ?, worker = ?, lease_expires_at = ?, attempts = attempts + 1, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (VALIDATING, worker, now + lease_seconds, now, row["id"]),
            )
            return job_of(db.execute("SELECT * FROM ft_jobs WHERE id = ?", (row["id"],)).fetchone())

    def update_claimed(self, job_id: str, worker: str, **changes: Any) -> bool:
        check_job_fields(changes)
        values = [json_value(k, v) for k, v in changes.items()]
        with self._write() as db:
            cur = db.execute(
                f"UPDATE ft_jobs SET {', '.join(f'{k} = ?' for k in changes)} "
                f"WHERE id = ? AND worker = ? AND status IN ({_marks(2)})",
                (*values, job_id, worker, *CLAIMED),
            )
            return cur.rowcount == 1

    def release_job(self, job_id: str, worker: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE ft_jobs SET status = ?, worker = NULL, lease_expires_at = NULL, attempts = attempts - 1 "
                f"WHERE id = ? AND worker = ? AND status IN ({_marks(2)})",
                (QUEUED, job_id, worker, *CLAIMED),
            )
            return cur.rowcount == 1

    def add_event(self, event: JobEvent) -> None:
        data = None if event.data is None else json.dumps(event.data)
        with self._write() as db:
            db.execute(
                "INSERT INTO ft_events (id, job_id, created_at, level, type, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event.id, event.job_id, event.created_at, event.level, event.type, event.message, data),
            )

    def list_events(self, job_id: str, after: str | None, limit: int) -> list[JobEvent]:
        where, args = "job_id = ?", [job_id]
        if after is not None:
            where += " AND seq < COALESCE((SELECT seq FROM ft_events WHERE id = ?), -1)"
            args.append(after)
        rows = self._rows(f"SELECT * FROM ft_events WHERE {where} ORDER BY seq DESC LIMIT ?", *args, limit)
        return [event_of(r) for r in rows]


def _marks(n: int) -> str:
    return ", ".join("?" * n)
