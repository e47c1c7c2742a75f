"""The metadata store seam: tenants and keys, repos, revisions and their files. SQLite by default
(`sqlite_store.py`); a PostgreSQL implementation fills the same protocol when the registry outgrows one machine.

Fine-tuning jobs and uploaded training files will get their own method group here when training lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class RepoExistsError(ValueError):
    pass


class StaleHeadError(RuntimeError):
    """The branch moved while a commit was being prepared: the caller rebuilds the tree on the new head."""


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


class MetadataStore(Protocol):
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
        """Whether any unrevoked key exists (if not, the registry runs in single-user mode)."""
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
