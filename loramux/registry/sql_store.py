"""The metadata store's statements, once for both databases: `SQLStore` holds every query and transaction of
`MetadataStore`; a dialect (`sqlite_store.py`, `postgres_store.py`) adds its connections, its schema and the few
words in which the two differ (placeholders, row locks, the error of a duplicate key).

Every change is one write transaction: the checks it makes and the rows it writes see one state of the database.
On PostgreSQL, where several processes write at once, the rows a change depends on are locked first (`FOR UPDATE`):
commits to one repo run one after the other, and a job is claimed by one worker only (`SKIP LOCKED`: a worker racing
another for the oldest job takes the next). SQLite takes the database's write lock at the start of the transaction.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import astuple
from typing import Any, Protocol

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

Row = Mapping[str, Any]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Transaction(Protocol):
    """A write transaction: statements with `?` placeholders; rows read by column name."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class SQLStore(ABC):
    """`MetadataStore` over a SQL database; subclasses give the connections and the dialect's words."""

    # The rows a transaction reads to decide what it writes: locked until it ends (where the database locks rows).
    FOR_UPDATE = ""
    # The oldest queued job, locked; another worker's claim in progress is passed over.
    SKIP_LOCKED = ""
    # The error of an insert that met a unique key (a repo, tenant or namespace created meanwhile).
    DUPLICATE: type[Exception] | tuple[type[Exception], ...] = ()

    @abstractmethod
    def _write(self) -> AbstractContextManager[Transaction]:
        """One write transaction, committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def _rows(self, sql: str, *args: Any) -> list[Row]:
        """The rows of one read (`?` placeholders)."""

    # --- tenants and keys
    def create_tenant(self, name: str) -> Tenant:
        now = time.time()
        try:
            with self._write() as db:
                if db.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                    raise ValueError(f"tenant {name!r} already exists")
                owner = db.execute("SELECT tenant FROM namespaces WHERE namespace = ?", (name,)).fetchone()
                if owner:
                    raise ValueError(f"namespace {name!r} already belongs to tenant {owner['tenant']!r}")
                db.execute("INSERT INTO tenants VALUES (?, ?)", (name, now))
                db.execute("INSERT INTO namespaces VALUES (?, ?)", (name, name))
        except self.DUPLICATE as exc:  # created meanwhile by another process
            raise ValueError(f"tenant or namespace {name!r} already exists") from exc
        return Tenant(name, now)

    def list_tenants(self) -> list[Tenant]:
        return [Tenant(r["name"], r["created_at"]) for r in self._rows("SELECT * FROM tenants ORDER BY name")]

    def add_namespace(self, tenant: str, namespace: str) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone():
                raise ValueError(f"no tenant {tenant!r}")
            db.execute("INSERT INTO namespaces VALUES (?, ?) ON CONFLICT DO NOTHING", (namespace, tenant))
            owner = db.execute("SELECT tenant FROM namespaces WHERE namespace = ?", (namespace,)).fetchone()
            if owner["tenant"] != tenant:
                raise ValueError(f"namespace {namespace!r} already belongs to tenant {owner['tenant']!r}")

    def namespace_owner(self, namespace: str) -> str | None:
        found = self._rows("SELECT tenant FROM namespaces WHERE namespace = ?", namespace)
        return found[0]["tenant"] if found else None

    def namespaces_of(self, tenant: str) -> list[str]:
        found = self._rows("SELECT namespace FROM namespaces WHERE tenant = ? ORDER BY 1", tenant)
        return [r["namespace"] for r in found]

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
        found = self._rows("SELECT tenant FROM api_keys WHERE token_hash = ? AND revoked_at IS NULL", token_hash)
        return found[0]["tenant"] if found else None

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
            return cur.rowcount == 1

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + (" WHERE tenant = ?" if tenant else "") + " ORDER BY created_at"
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
                    "INSERT INTO repos (namespace, name, private, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                    (namespace, name, private, now),
                ).fetchone()
        except self.DUPLICATE as exc:
            raise RepoExistsError(f"repo {namespace}/{name} already exists") from exc
        return Repo(row["id"], namespace, name, private, now)

    def get_repo(self, namespace: str, name: str) -> Repo | None:
        found = self._rows("SELECT * FROM repos WHERE namespace = ? AND name = ?", namespace, name)
        return repo_of(found[0]) if found else None

    def list_repos(self, namespace: str | None = None) -> list[Repo]:
        if namespace is None:
            return [repo_of(r) for r in self._rows("SELECT * FROM repos ORDER BY namespace, name")]
        return [repo_of(r) for r in self._rows("SELECT * FROM repos WHERE namespace = ? ORDER BY name", namespace)]

    def set_private(self, repo: Repo, private: bool) -> None:
        with self._write() as db:
            db.execute("UPDATE repos SET private = ? WHERE id = ?", (private, repo.id))

    def delete_repo(self, repo: Repo) -> set[str]:
        with self._write() as db:
            if not db.execute(f"SELECT 1 FROM repos WHERE id = ?{self.FOR_UPDATE}", (repo.id,)).fetchone():
                return set()  # deleted meanwhile by another process, with its blobs
            blobs = [
                r["sha256"]
                for r in db.execute(
                    "SELECT DISTINCT f.sha256 FROM files f JOIN revisions v ON v.commit_id = f.commit_id "
                    "WHERE v.repo_id = ?",
                    (repo.id,),
                )
            ]
            db.execute("DELETE FROM repos WHERE id = ?", (repo.id,))  # cascades to refs, revisions, files
            if not blobs:
                return set()
            still_used = db.execute(
                f"SELECT sha256 FROM files WHERE sha256 IN ({_marks(len(blobs))}) "
                f"UNION SELECT sha256 FROM uploads WHERE sha256 IN ({_marks(len(blobs))})",
                (*blobs, *blobs),
            ).fetchall()
        return set(blobs) - {r["sha256"] for r in still_used}

    # --- revisions
    def add_revision(self, revision: Revision, files: list[FileEntry], branch: str) -> None:
        with self._write() as db:
            # The repo's row lock: commits to one repo, from any process, run one after the other from here on.
            if not db.execute(f"SELECT 1 FROM repos WHERE id = ?{self.FOR_UPDATE}", (revision.repo,)).fetchone():
                raise LookupError("the repo was deleted during the push")
            row = db.execute(
                "SELECT commit_id FROM refs WHERE repo_id = ? AND branch = ?", (revision.repo, branch)
            ).fetchone()
            if (row["commit_id"] if row else None) != revision.parent:
                raise StaleHeadError(f"branch {branch} moved")
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
        found = self._rows(
            "SELECT v.* FROM refs r JOIN revisions v ON v.commit_id = r.commit_id WHERE r.repo_id = ? AND r.branch = ?",
            repo.id,
            branch,
        )
        return revision_of(found[0]) if found else None

    def get_revision(self, repo: Repo, commit: str) -> Revision | None:
        found = self._rows("SELECT * FROM revisions WHERE repo_id = ? AND commit_id = ?", repo.id, commit)
        return revision_of(found[0]) if found else None

    def list_revisions(self, repo: Repo) -> list[Revision]:
        found = self._rows("SELECT * FROM revisions WHERE repo_id = ? ORDER BY seq DESC", repo.id)
        return [revision_of(r) for r in found]

    def files(self, commit: str) -> list[FileEntry]:
        found = self._rows("SELECT path, sha256, size FROM files WHERE commit_id = ? ORDER BY path", commit)
        return [FileEntry(r["path"], r["sha256"], r["size"]) for r in found]

    def referenced_blobs(self) -> set[str]:
        return {r["sha256"] for r in self._rows("SELECT sha256 FROM files UNION SELECT sha256 FROM uploads")}

    # --- uploaded training files
    def add_upload(self, upload: UploadedFile) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO uploads (id, tenant, filename, purpose, sha256, bytes, examples, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                astuple(upload),
            )

    def get_upload(self, file_id: str) -> UploadedFile | None:
        found = self._rows("SELECT * FROM uploads WHERE id = ?", file_id)
        return upload_of(found[0]) if found else None

    def list_uploads(self, tenant: str | None) -> list[UploadedFile]:
        if tenant is None:
            return [upload_of(r) for r in self._rows("SELECT * FROM uploads ORDER BY seq DESC")]
        return [upload_of(r) for r in self._rows("SELECT * FROM uploads WHERE tenant = ? ORDER BY seq DESC", tenant)]

    def delete_upload(self, file_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM uploads WHERE id = ?", (file_id,)).rowcount == 1

    # --- fine-tuning jobs: every state change is a conditional UPDATE (or reads rows locked first) inside a write
    # transaction, so two workers never both claim a job and a worker that lost its claim never overwrites what
    # happened since.
    def add_job(self, job: FineTuningJob) -> None:
        row = job_values(job)
        with self._write() as db:
            db.execute(f"INSERT INTO ft_jobs ({', '.join(row)}) VALUES ({_marks(len(row))})", tuple(row.values()))

    def get_job(self, job_id: str) -> FineTuningJob | None:
        found = self._rows("SELECT * FROM ft_jobs WHERE id = ?", job_id)
        return job_of(found[0]) if found else None

    def list_jobs(self, tenant: str | None, everyone: bool, after: str | None, limit: int) -> list[FineTuningJob]:
        if everyone:
            where, args = "1 = 1", []
        else:
            where, args = ("tenant IS NULL", []) if tenant is None else ("tenant = ?", [tenant])
        if after is not None:
            where += " AND seq < COALESCE((SELECT seq FROM ft_jobs WHERE id = ?), -1)"
            args.append(after)
        found = self._rows(f"SELECT * FROM ft_jobs WHERE {where} ORDER BY seq DESC LIMIT ?", *args, limit)
        return [job_of(r) for r in found]

    def cancel_job(self, job_id: str, now: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE ft_jobs SET status = 'cancelled', finished_at = ?, lease_expires_at = NULL "
                f"WHERE id = ? AND status IN ({_marks(3)})",
                (now, job_id, QUEUED, *CLAIMED),
            )
            return cur.rowcount == 1

    def expire_leases(self, now: float) -> list[tuple[FineTuningJob, str]]:
        changed = []
        with self._write() as db:
            expired = db.execute(
                f"SELECT * FROM ft_jobs WHERE status IN ({_marks(2)}) AND lease_expires_at < ?{self.FOR_UPDATE}",
                (*CLAIMED, now),
            ).fetchall()
            for job in map(job_of, expired):
                if job.attempts >= job.max_attempts:
                    error = {
                        "code": "worker_lost",
                        "message": f"the training worker stopped answering on the last of {job.max_attempts} attempts",
                        "param": None,
                    }
                    db.execute(
                        "UPDATE ft_jobs SET status = ?, error = ?, finished_at = ?, worker = NULL, "
                        "lease_expires_at = NULL WHERE id = ?",
                        (FAILED, json_value("error", error), now, job.id),
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
            row = db.execute(
                f"SELECT id FROM ft_jobs WHERE status = ? ORDER BY seq LIMIT 1{self.SKIP_LOCKED}", (QUEUED,)
            ).fetchone()
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
        found = self._rows(f"SELECT * FROM ft_events WHERE {where} ORDER BY seq DESC LIMIT ?", *args, limit)
        return [event_of(r) for r in found]


def _marks(n: int) -> str:
    return ", ".join("?" * n)
