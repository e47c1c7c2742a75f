"""The metadata store on PostgreSQL, for a registry that several processes on several machines share (every
`loramux hub`, `loramux serve` and `loramux train-worker` pointed at one `--database-url`).

psycopg 3, through the pool of `postgres_connections.py`. The tables are created and changed by the Alembic migrations
in `migrations/` (`loramux db upgrade`); a process refuses to start on a database whose schema is not the one it
knows.

Commits to one repo are serialized by a lock on the repo's row: the head a commit checks is the head it moves, and
its revision, files and ref are written in one transaction, so a push that fails half-way (the database restarting,
say) leaves nothing behind. A database that cannot be reached raises `StorageUnavailableError` (HTTP 503).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from loramux.registry.postgres_connections import Connections, check_schema, unavailable
from loramux.registry.rows import (
    JOB_FIELDS,
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

BLOB_LOCK = 0x6C6D78626C6F62  # the advisory lock key of `blob_lock` ("lmxblob")


class PostgresStore:
    """`MetadataStore` on PostgreSQL. `url` is a libpq URL (`postgresql://user:password@host:port/dbname`)."""

    def __init__(self, url: str, max_connections: int = 8, timeout: float = 5.0) -> None:
        check_schema(url, timeout)
        self._pool = Connections(url, max_connections, timeout)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        with unavailable(), self._pool.connection() as conn, conn.transaction():
            yield conn

    def _rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with unavailable(), self._pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    @contextmanager
    def blob_lock(self, exclusive: bool) -> Iterator[None]:
        # A session-level advisory lock, held on a connection of its own for as long as the caller needs it. A
        # session that ends (its process died, the database restarted) releases it.
        mode = "" if exclusive else "_shared"
        with unavailable(), self._pool.connection() as conn:
            conn.execute(f"SELECT pg_advisory_lock{mode}(%s)", (BLOB_LOCK,))
            try:
                yield
            finally:
                try:
                    conn.execute(f"SELECT pg_advisory_unlock{mode}(%s)", (BLOB_LOCK,))
                except psycopg.Error:
                    conn.close()  # never hand back a connection that may still hold the lock

    # --- tenants and keys
    def create_tenant(self, name: str) -> Tenant:
        now = time.time()
        try:
            with self._write() as db:
                if db.execute("SELECT 1 FROM tenants WHERE name = %s", (name,)).fetchone():
                    raise ValueError(f"tenant {name!r} already exists")
                owner = db.execute("SELECT tenant FROM namespaces WHERE namespace = %s", (name,)).fetchone()
                if owner:
                    raise ValueError(f"namespace {name!r} already belongs to tenant {owner['tenant']!r}")
                db.execute("INSERT INTO tenants VALUES (%s, %s)", (name, now))
                db.execute("INSERT INTO namespaces VALUES (%s, %s)", (name, name))
        except pg_errors.UniqueViolation as exc:  # created meanwhile by another process
            raise ValueError(f"tenant or namespace {name!r} already exists") from exc
        return Tenant(name, now)

    def list_tenants(self) -> list[Tenant]:
        return [Tenant(r["name"], r["created_at"]) for r in self._rows("SELECT * FROM tenants ORDER BY name")]

    def add_namespace(self, tenant: str, namespace: str) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name = %s", (tenant,)).fetchone():
                raise ValueError(f"no tenant {tenant!r}")
            db.execute("INSERT INTO namespaces VALUES (%s, %s) ON CONFLICT DO NOTHING", (namespace, tenant))
            owner = db.execute("SELECT tenant FROM namespaces WHERE namespace = %s", (namespace,)).fetchone()
            if owner["tenant"] != tenant:
                raise ValueError(f"namespace {namespace!r} already belongs to tenant {owner['tenant']!r}")

    def namespace_owner(self, namespace: str) -> str | None:
        found = self._rows("SELECT tenant FROM namespaces WHERE namespace = %s", namespace)
        return found[0]["tenant"] if found else None

    def namespaces_of(self, tenant: str) -> list[str]:
        found = self._rows("SELECT namespace FROM namespaces WHERE tenant = %s ORDER BY 1", tenant)
        return [r["namespace"] for r in found]

    def add_key(self, key_id: str, tenant: str, token_hash: str, description: str) -> ApiKey:
        now = time.time()
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name = %s", (tenant,)).fetchone():
                raise ValueError(f"no tenant {tenant!r}: create it first with `loramux tenants create {tenant}`")
            db.execute(
                "INSERT INTO api_keys (key_id, tenant, token_hash, description, created_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (key_id, tenant, token_hash, description, now),
            )
        return ApiKey(key_id, tenant, description, now)

    def tenant_for_token_hash(self, token_hash: str) -> str | None:
        found = self._rows("SELECT tenant FROM api_keys WHERE token_hash = %s AND revoked_at IS NULL", token_hash)
        return found[0]["tenant"] if found else None

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL", (time.time(), key_id)
            )
            return cur.rowcount == 1

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + (" WHERE tenant = %s" if tenant else "") + " ORDER BY created_at"
        found = self._rows(sql, *([tenant] if tenant else []))
        return [ApiKey(r["key_id"], r["tenant"], r["description"], r["created_at"], r["revoked_at"]) for r in found]

    def has_keys(self) -> bool:
        # Revoked keys count: revoking the last key must lock the registry, never reopen it to everyone.
        return bool(self._rows("SELECT 1 FROM api_keys LIMIT 1"))

    # --- repos
    def create_repo(self, namespace: str, name: str, private: bool) -> Repo:
        now = time.time()
        try:
            with self._write() as db:
                row = db.execute(
                    "INSERT INTO repos (namespace, name, private, created_at) VALUES (%s, %s, %s, %s) RETURNING id",
                    (namespace, name, private, now),
                ).fetchone()
        except pg_errors.UniqueViolation as exc:
            raise RepoExistsError(f"repo {namespace}/{name} already exists") from exc
        return Repo(row["id"], namespace, name, private, now)

    def get_repo(self, namespace: str, name: str) -> Repo | None:
        found = self._rows("SELECT * FROM repos WHERE namespace = %s AND name = %s", namespace, name)
        return repo_of(found[0]) if found else None

    def list_repos(self, namespace: str | None = None) -> list[Repo]:
        if namespace is None:
            return [repo_of(r) for r in self._rows("SELECT * FROM repos ORDER BY namespace, name")]
        return [repo_of(r) for r in self._rows("SELECT * FROM repos WHERE namespace = %s ORDER BY name", namespace)]

    def set_private(self, repo: Repo, private: bool) -> None:
        with self._write() as db:
            db.execute("UPDATE repos SET private = %s WHERE id = %s", (private, repo.id))

    def delete_repo(self, repo: Repo) -> set[str]:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM repos WHERE id = %s FOR UPDATE", (repo.id,)).fetchone():
                return set()  # deleted meanwhile by another process, with its blobs
            blobs = [
                r["sha256"]
                for r in db.execute(
                    "SELECT DISTINCT f.sha256 FROM files f JOIN revisions v ON v.commit_id = f.commit_id "
                    "WHERE v.repo_id = %s",
                    (repo.id,),
                )
            ]
            db.execute("DELETE FROM repos WHERE id = %s", (repo.id,))  # cascades to refs, revisions, files
            still_used = db.execute(
                "SELECT sha256 FROM files WHERE sha256 = ANY(%s) "
                "UNION SELECT sha256 FROM uploads WHERE sha256 = ANY(%s)",
                (blobs, blobs),
            ).fetchall()
        return set(blobs) - {r["sha256"] for r in still_used}

    # --- revisions
    def add_revision(self, revision: Revision, files: list[FileEntry], branch: str) -> None:
        with self._write() as db:
            # The repo's row lock: commits to one repo, from any process, run one after the other from here on.
            if not db.execute("SELECT 1 FROM repos WHERE id = %s FOR UPDATE", (revision.repo,)).fetchone():
                raise LookupError("the repo was deleted during the push")
            row = db.execute(
                "SELECT commit_id FROM refs WHERE repo_id = %s AND branch = %s", (revision.repo, branch)
            ).fetchone()
            if (row["commit_id"] if row else None) != revision.parent:
                raise StaleHeadError(f"branch {branch} moved")
            db.execute(
                "INSERT INTO revisions (commit_id, repo_id, parent, message, kind, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (revision.commit, revision.repo, revision.parent, revision.message, revision.kind, revision.created_at),
            )
            rows = [(revision.commit, f.path, f.sha256, f.size) for f in files]
            db.cursor().executemany("INSERT INTO files VALUES (%s, %s, %s, %s)", rows)
            db.execute(
                "INSERT INTO refs VALUES (%s, %s, %s) "
                "ON CONFLICT (repo_id, branch) DO UPDATE SET commit_id = excluded.commit_id",
                (revision.repo, branch, revision.commit),
            )

    def head(self, repo: Repo, branch: str) -> Revision | None:
        found = self._rows(
            "SELECT v.* FROM refs r JOIN revisions v ON v.commit_id = r.commit_id "
            "WHERE r.repo_id = %s AND r.branch = %s",
            repo.id,
            branch,
        )
        return revision_of(found[0]) if found else None

    def get_revision(self, repo: Repo, commit: str) -> Revision | None:
        found = self._rows("SELECT * FROM revisions WHERE repo_id = %s AND commit_id = %s", repo.id, commit)
        return revision_of(found[0]) if found else None

    def list_revisions(self, repo: Repo) -> list[Revision]:
        found = self._rows("SELECT * FROM revisions WHERE repo_id = %s ORDER BY seq DESC", repo.id)
        return [revision_of(r) for r in found]

    def files(self, commit: str) -> list[FileEntry]:
        found = self._rows("SELECT path, sha256, size FROM files WHERE commit_id = %s ORDER BY path", commit)
        return [FileEntry(r["path"], r["sha256"], r["size"]) for r in found]

    def referenced_blobs(self) -> set[str]:
        return {r["sha256"] for r in self._rows("SELECT sha256 FROM files UNION SELECT sha256 FROM uploads")}

    # --- uploaded training files
    def add_upload(self, upload: UploadedFile) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO uploads (id, tenant, filename, purpose, sha256, bytes, examples, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                astuple(upload),
            )

    def get_upload(self, file_id: str) -> UploadedFile | None:
        found = self._rows("SELECT * FROM uploads WHERE id = %s", file_id)
        return upload_of(found[0]) if found else None

    def list_uploads(self, tenant: str | None) -> list[UploadedFile]:
        if tenant is None:
            return [upload_of(r) for r in self._rows("SELECT * FROM uploads ORDER BY seq DESC")]
        found = self._rows("SELECT * FROM uploads WHERE tenant = %s ORDER BY seq DESC", tenant)
        return [upload_of(r) for r in found]

    def delete_upload(self, file_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM uploads WHERE id = %s", (file_id,)).rowcount == 1

    # --- fine-tuning jobs: every state change is one conditional UPDATE (or a row locked first), so two workers
    # never both claim a job and a worker that lost its claim never overwrites what happened since.
    def add_job(self, job: FineTuningJob) -> None:
        row = job_values(job)
        with self._write() as db:
            db.execute(
                f"INSERT INTO ft_jobs ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})", tuple(row.values())
            )

    def get_job(self, job_id: str) -> FineTuningJob | None:
        found = self._rows("SELECT * FROM ft_jobs WHERE id = %s", job_id)
        return job_of(found[0]) if found else None

    def list_jobs(self, tenant: str | None, everyone: bool, after: str | None, limit: int) -> list[FineTuningJob]:
        where, args = ("TRUE", []) if everyone else ("tenant IS NOT DISTINCT FROM %s", [tenant])
        if after is not None:
            where += " AND seq < COALESCE((SELECT seq FROM ft_jobs WHERE id = %s), -1)"
            args.append(after)
        found = self._rows(f"SELECT * FROM ft_jobs WHERE {where} ORDER BY seq DESC LIMIT %s", *args, limit)
        return [job_of(r) for r in found]

    def cancel_job(self, job_id: str, now: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE ft_jobs SET status = 'cancelled', finished_at = %s, lease_expires_at = NULL "
                "WHERE id = %s AND status = ANY(%s)",
                (now, job_id, [QUEUED, *CLAIMED]),
            )
            return cur.rowcount == 1

    def expire_leases(self, now: float) -> list[tuple[FineTuningJob, str]]:
        changed = []
        with self._write() as db:
            expired = db.execute(
                "SELECT * FROM ft_jobs WHERE status = ANY(%s) AND lease_expires_at < %s FOR UPDATE",
                (list(CLAIMED), now),
            ).fetchall()
            for job in map(job_of, expired):
                if job.attempts >= job.max_attempts:
                    error = {
                        "code": "worker_lost",
                        "message": f"the training worker stopped answering on the last of {job.max_attempts} attempts",
                        "param": None,
                    }
                    db.execute(
                        "UPDATE ft_jobs SET status = %s, error = %s, finished_at = %s, worker = NULL, "
                        "lease_expires_at = NULL WHERE id = %s",
                        (FAILED, json_value("error", error), now, job.id),
                    )
                    changed.append((job, FAILED))
                else:
                    db.execute(
                        "UPDATE ft_jobs SET status = %s, worker = NULL, lease_expires_at = NULL WHERE id = %s",
                        (QUEUED, job.id),
                    )
                    changed.append((job, QUEUED))
        return changed

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> FineTuningJob | None:
        with self._write() as db:
            # SKIP LOCKED: a worker racing another for the same oldest job takes the next one instead of waiting.
            row = db.execute(
                "WITH next AS (SELECT id FROM ft_jobs WHERE status = %s ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "UPDATE ft_jobs j SET status = %s, worker = %s, lease_expires_at = %s, attempts = attempts + 1, "
                f"started_at = COALESCE(started_at, %s) FROM next WHERE j.id = next.id RETURNING {_job_columns('j')}",
                (QUEUED, VALIDATING, worker, now + lease_seconds, now),
            ).fetchone()
        return job_of(row) if row else None

    def update_claimed(self, job_id: str, worker: str, **changes: Any) -> bool:
        check_job_fields(changes)
        values = [json_value(k, v) for k, v in changes.items()]
        with self._write() as db:
            cur = db.execute(
                f"UPDATE ft_jobs SET {', '.join(f'{k} = %s' for k in changes)} "
                "WHERE id = %s AND worker = %s AND status = ANY(%s)",
                (*values, job_id, worker, list(CLAIMED)),
            )
            return cur.rowcount == 1

    def release_job(self, job_id: str, worker: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE ft_jobs SET status = %s, worker = NULL, lease_expires_at = NULL, attempts = attempts - 1 "
                "WHERE id = %s AND worker = %s AND status = ANY(%s)",
                (QUEUED, job_id, worker, list(CLAIMED)),
            )
            return cur.rowcount == 1

    def add_event(self, event: JobEvent) -> None:
        data = None if event.data is None else json.dumps(event.data)
        with self._write() as db:
            db.execute(
                "INSERT INTO ft_events (id, job_id, created_at, level, type, message, data) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (event.id, event.job_id, event.created_at, event.level, event.type, event.message, data),
            )

    def list_events(self, job_id: str, after: str | None, limit: int) -> list[JobEvent]:
        where, args = "job_id = %s", [job_id]
        if after is not None:
            where += " AND seq < COALESCE((SELECT seq FROM ft_events WHERE id = %s), -1)"
            args.append(after)
        found = self._rows(f"SELECT * FROM ft_events WHERE {where} ORDER BY seq DESC LIMIT %s", *args, limit)
        return [event_of(r) for r in found]


def _job_columns(alias: str) -> str:
    return ", ".join(f"{alias}.{name}" for name in JOB_FIELDS)
