"""The metadata store seam: tenants and keys, repos, revisions and their files. Its statements are written once
(`sql_store.py`) for two databases: SQLite by default (`sqlite_store.py`, one machine); PostgreSQL
(`postgres_store.py`) when several processes on several machines share one registry.

Uploaded training files, fine-tuning jobs and their events have their own method group (`jobs.py` is their facade).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


class RepoExistsError(ValueError):
    pass


class StaleHeadError(RuntimeError):
    """The branch moved while a commit was being prepared: the caller rebuilds the tree on the new head."""


class StorageUnavailableError(ConnectionError):
    """The registry's database or its blob bucket cannot be reached, or refused the request: nothing was recorded,
    and the same request may succeed later (HTTP 503). The message has the details, for the logs and the CLI;
    `store` ("database" or "bucket") is what an HTTP answer names, without hosts or names."""

    def __init__(self, message: str, store: str) -> None:
        super().__init__(message)
        self.store = store

    @property
    def public_message(self) -> str:
        return f"The registry's {self.store} is unavailable; nothing was changed, retry later."


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: float


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    description: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class Repo:
    id: int
    namespace: str
    name: str
    private: bool
    created_at: float

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Revision:
    commit: str  # 40 hex digits, immutable
    repo: int  # Repo.id
    parent: str | None
    message: str
    kind: str  # "adapter" (holds adapter_config.json) or "model"
    created_at: float


# A fine-tuning job's life: queued -> validating_files (claimed: the worker checks and copies the files) -> running
# -> succeeded | failed | cancelled. A lost lease sends a claimed job back to queued (or to failed).
QUEUED, VALIDATING, RUNNING = "queued", "validating_files", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
CLAIMED = (VALIDATING, RUNNING)
ACTIVE = (QUEUED, *CLAIMED)
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class UploadedFile:
    id: str  # "file-..."
    tenant: str | None  # None: single-user mode
    filename: str
    purpose: str
    sha256: str  # the content, in the blob store
    bytes: int
    examples: int
    created_at: float


@dataclass(frozen=True)
class FineTuningJob:
    """A fine-tuning job. `settings` are `TrainingSpec` settings (without data, output_dir and base, which the worker
    fills in); `hyperparameters` is what the API shows; `base` is the base model as the server loaded it (directory,
    hub id, or None for the default)."""

    id: str  # "ftjob-..."
    tenant: str | None
    model: str  # the base's name as the API shows it
    base: str | None
    training_file: str
    validation_file: str | None
    suffix: str | None
    repo_id: str  # the adapter repo the result becomes a revision of
    settings: dict[str, Any]
    hyperparameters: dict[str, Any]
    seed: int
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    fine_tuned_model: str | None = None
    result_commit: str | None = None
    error: dict[str, Any] | None = None  # {"code", "message", "param"} once failed
    trained_tokens: int | None = None
    attempts: int = 0  # claims so far
    max_attempts: int = MAX_ATTEMPTS
    worker: str | None = None  # who holds the claim
    lease_expires_at: float | None = None


@dataclass(frozen=True)
class JobEvent:
    id: str  # "ftevent-..."
    job_id: str
    created_at: float
    level: str  # info, warn or error
    type: str  # "message", or "metrics" for a training step or a validation
    message: str
    data: dict[str, Any] | None = None


class MetadataStore(Protocol):
    def blob_lock(self, exclusive: bool) -> AbstractContextManager[None]:
        """Held, across every process sharing this store, while a commit checks its blobs and records them (shared)
        and while blobs that nothing refers to are deleted (exclusive): a blob is never deleted between a commit's
        check and its record."""
        ...

    def close(self) -> None: ...

    # --- tenants, namespaces and API keys (keys are stored as the sha256 of the token, never the token)
    def create_tenant(self, name: str) -> Tenant: ...
    def list_tenants(self) -> list[Tenant]: ...
    def add_namespace(self, tenant: str, namespace: str) -> None: ...
    def namespace_owner(self, namespace: str) -> str | None: ...
    def namespaces_of(self, tenant: str) -> list[str]: ...
    def add_key(self, key_id: str, tenant: str, token_hash: str, description: str) -> ApiKey: ...
    def tenant_for_token_hash(self, token_hash: str) -> str | None: ...
    def revoke_key(self, key_id: str) -> bool: ...
    def list_keys(self, tenant: str | None = None) -> list[ApiKey]: ...
    def has_keys(self) -> bool:
        """Whether API keys were ever configured, revoked ones included (if not, the registry runs in single-user
        mode). Revoking every key therefore locks the registry instead of opening it to anyone."""
        ...

    # --- repos
    def create_repo(self, namespace: str, name: str, private: bool) -> Repo: ...
    def get_repo(self, namespace: str, name: str) -> Repo | None: ...
    def list_repos(self, namespace: str | None = None) -> list[Repo]: ...
    def set_private(self, repo: Repo, private: bool) -> None: ...
    def delete_repo(self, repo: Repo) -> set[str]:
        """Remove the repo with its revisions; returns the sha256 of blobs no revision refers to any more."""
        ...

    # --- revisions and their files (each revision lists all of its files, not a diff)
    def add_revision(self, revision: Revision, files: list[FileEntry], branch: str) -> None:
        """Record `revision` and move `branch` to it, in one transaction, only if the branch still points at
        `revision.parent`; raises StaleHeadError otherwise (another push got there first)."""
        ...

    def head(self, repo: Repo, branch: str) -> Revision | None: ...
    def get_revision(self, repo: Repo, commit: str) -> Revision | None: ...
    def list_revisions(self, repo: Repo) -> list[Revision]:
        """Newest first."""
        ...

    def files(self, commit: str) -> list[FileEntry]: ...
    def referenced_blobs(self) -> set[str]: ...

    # --- uploaded training files, fine-tuning jobs and their events
    def add_upload(self, upload: UploadedFile) -> None: ...
    def get_upload(self, file_id: str) -> UploadedFile | None: ...
    def list_uploads(self, tenant: str | None) -> list[UploadedFile]:
        """Newest first; `tenant` None lists every tenant's."""
        ...

    def delete_upload(self, file_id: str) -> bool: ...
    def add_job(self, job: FineTuningJob) -> None: ...
    def get_job(self, job_id: str) -> FineTuningJob | None: ...
    def list_jobs(self, tenant: str | None, everyone: bool, after: str | None, limit: int) -> list[FineTuningJob]:
        """Newest first, those after the job `after`; `tenant`'s only unless `everyone`."""
        ...

    def cancel_job(self, job_id: str, now: float) -> bool:
        """Cancel an active job; False when it has already ended."""
        ...

    def expire_leases(self, now: float) -> list[tuple[FineTuningJob, str]]:
        """Claimed jobs whose lease ended before `now` go back to queued, or to failed after their last attempt;
        returns each as it was, with its new status."""
        ...

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> FineTuningJob | None:
        """Atomically claim the oldest queued job (status validating_files, attempts + 1)."""
        ...

    def update_claimed(self, job_id: str, worker: str, **fields: Any) -> bool:
        """Set job fields only while `worker` holds the claim (status validating_files or running)."""
        ...

    def release_job(self, job_id: str, worker: str) -> bool: ...
    def add_event(self, event: JobEvent) -> None: ...
    def list_events(self, job_id: str, after: str | None, limit: int) -> list[JobEvent]:
        """Newest first, those after the event `after`."""
        ...
