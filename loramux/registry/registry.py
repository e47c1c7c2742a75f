"""The registry facade that the hub routes, the CLI and the serving process share: tenants and keys, access checks,
repos, immutable revisions, files and garbage collection. Built on a `MetadataStore` and a `BlobStore`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loramux.core import paths
from loramux.core.adapter_config import CONFIG_FILE
from loramux.core.validate import AdapterSummary, Limits, validate_adapter_files, validate_model_files
from loramux.registry.blobs import BlobStore, LocalBlobStore
from loramux.registry.hub_secret import SECRET_FILE, hub_secret
from loramux.registry.names import COMMIT_ID, MAIN, SHORT_COMMIT_ID, check_file_path, check_part, split_repo_id
from loramux.registry.sqlite_store import SQLiteStore
from loramux.registry.store import ApiKey, FileEntry, MetadataStore, Repo, Revision, StaleHeadError, Tenant

log = logging.getLogger(__name__)

TOKEN_PREFIX = "lmx_"


class Unauthorized(PermissionError):
    """No valid token where one is needed (HTTP 401)."""


class Forbidden(PermissionError):
    """A valid caller writing where it may not (HTTP 403)."""


class RepoNotFoundError(LookupError):
    """No such repo, or one the caller may not read: the two are never told apart."""


class RevisionNotFoundError(LookupError):
    pass


class EntryNotFoundError(LookupError):
    pass


class CommitError(ValueError):
    """A commit the registry refuses (invalid adapter, missing upload, bad path); nothing is recorded."""


class ConflictError(ValueError):
    """The commit's parent is no longer the head of the branch."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: a tenant, the local user of single-user mode (may do anything), or anonymous."""

    tenant: str | None = None
    local: bool = False


@dataclass(frozen=True)
class AddFile:
    path: str
    sha256: str  # the blob must already be in the blob store
    size: int


@dataclass(frozen=True)
class DeleteFile:
    path: str
    folder: bool = False


@dataclass(frozen=True)
class RepoView:
    """A repo with its newest revision of main (None while it has none)."""

    repo: Repo
    head: Revision | None


class Registry:
    def __init__(
        self,
        store: MetadataStore,
        blobs: BlobStore,
        limits: Limits | None = None,
        xorb_dir: Path | None = None,
        secret_file: Path | None = None,
    ) -> None:
        from loramux.registry.xet import XorbStore

        self.store, self.blobs, self.limits = store, blobs, limits or Limits()
        # Xet uploads' xorbs (registry/xet.py); a registry without a data directory keeps them in a temporary one.
        self.xorbs = XorbStore(xorb_dir if xorb_dir is not None else Path(tempfile.mkdtemp(prefix="loramux-xorbs-")))
        self._repo_locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # One commit or blob deletion at a time in this process (see `holding_blobs`), so that the process holds at
        # most one store lock, and one database connection for it, at a time.
        self._blob_lock = threading.Lock()
        # Extra checks of every adapter commit, {path: local file} -> raises AdapterValidationError; a serving
        # process adds one that refuses adapters its base model cannot load.
        self.adapter_checks: list[Callable[[Mapping[str, Path]], None]] = []
        self.secret = hub_secret(secret_file)

    @classmethod
    def open(
        cls, data_dir: Path | None = None, database_url: str | None = None, blob_url: str | None = None
    ) -> Registry:
        """The registry on the stores its configuration names. Metadata: SQLite in `data_dir` (default
        `paths.data_dir()`), or the PostgreSQL database at `database_url` (`postgresql://...`). Blobs: the folder
        `data_dir/blobs`, or the S3 bucket of `blob_url` (`s3://bucket/prefix`; endpoint and credentials from the
        usual AWS_* variables), read through a local cache in `data_dir/blob-cache`."""
        root = Path(data_dir) if data_dir is not None else paths.data_dir()
        if database_url is None:
            store: MetadataStore = SQLiteStore(root / "registry.sqlite3")
        elif database_url.split("://", 1)[0] in ("postgresql", "postgres"):
            with _needs_cluster_extra("a PostgreSQL registry"):
                from loramux.registry.postgres_store import PostgresStore
            store = PostgresStore(database_url)
        else:
            scheme = database_url.split("://", 1)[0] if "://" in database_url else database_url[:20]
            raise ValueError(f"the database URL must start with postgresql://, not {scheme!r}")
        try:
            if blob_url is None:
                blobs: BlobStore = LocalBlobStore(root / "blobs")
            elif blob_url.startswith("s3://"):
                with _needs_cluster_extra("blobs on S3"):
                    from loramux.registry.s3_blobs import S3BlobStore
                blobs = S3BlobStore(blob_url, root / "blob-cache")
            else:
                raise ValueError(f"the blob URL must be s3://BUCKET[/PREFIX], not {blob_url!r}")
        except BaseException:
            store.close()
            raise
        return cls(store, blobs, xorb_dir=root / "xorbs", secret_file=root / SECRET_FILE)

    def close(self) -> None:
        """Release the store's connections."""
        self.store.close()

    @contextmanager
    def holding_blobs(self, exclusive: bool) -> Iterator[None]:
        """Shared while a commit checks its blobs and records them, exclusive while blobs nothing refers to are
        deleted, across every process on the same store: a blob is never deleted between a commit's check and its
        record."""
        with self._blob_lock, self.store.blob_lock(exclusive):
            yield

    # --- tenants and keys
    def create_tenant(self, name: str) -> Tenant:
        return self.store.create_tenant(check_part(name, "tenant name"))

    def list_tenants(self) -> list[Tenant]:
        return self.store.list_tenants()

    def add_namespace(self, tenant: str, namespace: str) -> None:
        self.store.add_namespace(tenant, check_part(namespace, "namespace"))

    def create_key(self, tenant: str, description: str = "") -> tuple[ApiKey, str]:
        """A new API key for `tenant`; returns (its record, the token). The token is shown once: only its hash stays."""
        key_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        return self.store.add_key(key_id, tenant, _hash_token(token), description), token

    def revoke_key(self, key_id: str) -> None:
        if not self.store.revoke_key(key_id):
            raise ValueError(f"no active key {key_id!r}")

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        return self.store.list_keys(tenant)

    def authenticate(self, token: str | None) -> str | None:
        """The tenant a token belongs to, or None (no token, unknown or revoked)."""
        return self.store.tenant_for_token_hash(_hash_token(token)) if token else None

    def caller(self, token: str | None) -> Caller:
        """The caller behind a request's bearer token. With no keys configured everyone is the local user; once keys
        exist a missing token is anonymous (public reads only) and a wrong one is refused."""
        if not self.store.has_keys():
            return Caller(local=True)
        if not token:
            return Caller()
        tenant = self.authenticate(token)
        if tenant is None:
            raise Unauthorized("invalid or revoked token")
        return Caller(tenant=tenant)

    def caller_for_tenant(self, tenant: str | None) -> Caller:
        """The caller for an already-authenticated tenant (None: the local user in single-user mode, else anonymous)."""
        if tenant is None:
            return Caller(local=not self.store.has_keys())
        return Caller(tenant=tenant)

    # --- access
    def can_read(self, repo: Repo, caller: Caller) -> bool:
        return not repo.private or self._owns(repo.namespace, caller)

    def _owns(self, namespace: str, caller: Caller) -> bool:
        return caller.local or (caller.tenant is not None and self.store.namespace_owner(namespace) == caller.tenant)

    def check_write(self, namespace: str, caller: Caller) -> None:
        if self._owns(namespace, caller):
            return
        if caller.tenant is None:
            raise Unauthorized("a token is needed to write (API keys are configured on this hub)")
        raise Forbidden(f"tenant {caller.tenant!r} may not write to namespace {namespace!r}")

    # --- repos
    def create_repo(self, repo_id: str, caller: Caller, private: bool = False) -> Repo:
        """Raises `store.RepoExistsError` when it exists (and the caller may see it)."""
        namespace, name = split_repo_id(repo_id)
        self.check_write(namespace, caller)
        return self.store.create_repo(namespace, name, private)

    def repo(self, repo_id: str, caller: Caller) -> Repo:
        namespace, name = split_repo_id(repo_id)
        repo = self.store.get_repo(namespace, name)
        if repo is None or not self.can_read(repo, caller):
            raise RepoNotFoundError(f"repository {repo_id} not found")
        return repo

    def list_repos(self, caller: Caller, namespace: str | None = None, kind: str | None = None) -> list[RepoView]:
        """The repos `caller` may read that have a revision (optionally of one `kind`: "adapter" or "model")."""
        views = []
        for repo in self.store.list_repos(namespace):
            if not self.can_read(repo, caller):
                continue
            head = self.store.head(repo, MAIN)
            if head is not None and (kind is None or head.kind == kind):
                views.append(RepoView(repo, head))
        return views

    def set_private(self, repo_id: str, caller: Caller, private: bool) -> None:
        repo = self.repo(repo_id, caller)
        self.check_write(repo.namespace, caller)
        self.store.set_private(repo, private)

    def delete_repo(self, repo_id: str, caller: Caller) -> int:
        """Remove the repo and every revision; deletes the blobs nothing else refers to. Returns how many."""
        repo = self.repo(repo_id, caller)
        self.check_write(repo.namespace, caller)
        with self.holding_blobs(exclusive=True):
            orphans = self.store.delete_repo(repo)
            for sha in orphans:
                self.blobs.delete(sha)
        return len(orphans)

    def collect_garbage(self, grace_seconds: float = 3600.0) -> int:
        """Delete blobs no revision refers to (e.g. uploads of pushes that never committed), once older than
        `grace_seconds` so that a push in progress keeps its uploads; partial uploads left by crashed writers, as
        old; and Xet xorbs unused for a week. Returns how many files were deleted."""
        from loramux.registry.xet import XORB_RETENTION_SECONDS

        deleted = 0
        deleted += self.blobs.remove_partial_uploads(grace_seconds)
        with self.holding_blobs(exclusive=True):
            referenced = self.store.referenced_blobs()
            for sha, mtime in list(self.blobs.all_blobs()):
                if sha not in referenced and time.time() - mtime > grace_seconds:
                    self.blobs.delete(sha)
                    deleted += 1
        return deleted + self.xorbs.collect(max(grace_seconds, XORB_RETENTION_SECONDS))

    # --- revisions and files
    def revision(self, repo: Repo, rev: str | None) -> Revision:
        """`rev`: None or "main" (the newest revision), a 40-hex commit id of this repo, or a prefix of one of 7 or
        more hex digits (as `git` takes them) that no other revision of the repo shares."""
        if rev in (None, MAIN):
            head = self.store.head(repo, MAIN)
            if head is None:
                raise RevisionNotFoundError(f"{repo.repo_id} has no revision yet")
            return head
        rev = rev.lower()
        if COMMIT_ID.fullmatch(rev):
            found = self.store.get_revision(repo, rev)
        elif SHORT_COMMIT_ID.fullmatch(rev):
            matches = [r for r in self.store.list_revisions(repo) if r.commit.startswith(rev)]
            if len(matches) > 1:
                raise RevisionNotFoundError(
                    f"revision {rev!r} is ambiguous in {repo.repo_id}: {len(matches)} commits start with it; "
                    "give more digits"
                )
            found = matches[0] if matches else None
        else:
            found = None
        if found is None:
            raise RevisionNotFoundError(
                f"revision {rev!r} not found in {repo.repo_id} (a revision is 'main', a commit id or 7 or more of its "
                "first hex digits)"
            )
        return found

    def files(self, revision: Revision) -> list[FileEntry]:
        return self.store.files(revision.commit)

    def file(self, revision: Revision, path: str) -> FileEntry:
        for entry in self.store.files(revision.commit):
            if entry.path == path:
                return entry
        raise EntryNotFoundError(f"{path} not found in revision {revision.commit}")

    def blob_path(self, entry: FileEntry) -> Path:
        """The verified local path of a file's content; raises `blobs.BlobError` if missing or corrupted."""
        return self.blobs.verified_path(entry.sha256)

    def store_blob(self, stream: BinaryIO, expected_sha256: str | None = None, max_bytes: int | None = None):
        """Upload content ahead of a commit; returns (sha256, size). Not visible until a commit refers to it."""
        return self.blobs.put(stream, expected_sha256, max_bytes or self.limits.max_model_file_bytes)

    def summary(self, revision: Revision) -> AdapterSummary | None:
        """What an adapter revision holds (ranks, alpha, targets); None for a model revision."""
        if revision.kind != "adapter":
            return None
        files = {e.path: self.blob_path(e) for e in self.files(revision)}
        return validate_adapter_files(files, self.limits)

    def commit(
        self,
        repo_id: str,
        caller: Caller,
        operations: list[AddFile | DeleteFile],
        message: str,
        parent: str | None = None,
    ) -> Revision:
        """Record a new revision of main: the head's files with `operations` applied, validated as a whole.

        Pushes to one repo are serialized: each becomes its own revision on top of the one before. Nothing is
        recorded unless the whole commit is valid.
        """
        repo = self.repo(repo_id, caller)
        self.check_write(repo.namespace, caller)
        for op in operations:
            check_file_path(op.path.rstrip("/") if isinstance(op, DeleteFile) else op.path)
        with self._repo_lock(repo.id):
            for _ in range(50):  # another process may move the head between our read and our write: rebuild
                head = self.store.head(repo, MAIN)
                if parent is not None and (head is None or head.commit != parent):
                    raise ConflictError(f"parent commit {parent} is not the head of {MAIN}: pull and push again")
                tree = {e.path: e for e in self.files(head)} if head else {}
                for op in operations:
                    _apply(tree, op)
                if not tree:
                    raise CommitError("a revision must hold at least one file")
                with self.holding_blobs(exclusive=False):
                    kind = self._validate(tree, head)
                    revision = Revision(
                        commit=_commit_id(repo_id, head, tree, message),
                        repo=repo.id,
                        parent=head.commit if head else None,
                        message=message,
                        kind=kind,
                        created_at=time.time(),
                    )
                    try:
                        self.store.add_revision(revision, sorted(tree.values(), key=lambda e: e.path), MAIN)
                    except StaleHeadError:
                        continue
                    except LookupError as exc:
                        raise RepoNotFoundError(f"repository {repo_id} not found") from exc
                return revision
        raise CommitError(f"too many concurrent pushes to {repo_id}; try again")

    def _validate(self, tree: dict[str, FileEntry], head: Revision | None) -> str:
        files = {}
        for path, entry in tree.items():
            try:
                files[path] = self.blobs.verified_path(entry.sha256)
            except OSError as exc:
                raise CommitError(f"{path}: its upload is missing or damaged ({exc}); upload it again") from exc
            if files[path].stat().st_size != entry.size:
                raise CommitError(f"{path}: declared size {entry.size} does not match the uploaded data")
        if CONFIG_FILE in tree:
            validate_adapter_files(files, self.limits)
            for check in self.adapter_checks:
                check(files)
            return "adapter"
        if head is not None and head.kind == "adapter":
            raise CommitError(f"this repo holds an adapter: a revision without {CONFIG_FILE} is refused")
        validate_model_files(files, self.limits)
        return "model"

    def _repo_lock(self, repo: int) -> threading.Lock:
        with self._locks_guard:
            return self._repo_locks.setdefault(repo, threading.Lock())


@contextmanager
def _needs_cluster_extra(what: str) -> Iterator[None]:
    """Say which extra to install when an optional driver is missing, in one line."""
    try:
        yield
    except ImportError as exc:
        raise ValueError(f"{what} needs the cluster extra: pip install 'loramux[cluster]' ({exc})") from exc


def collect_garbage_periodically(registry: Registry, every_seconds: float = 3600.0) -> threading.Event:
    """Run `registry.collect_garbage()` every `every_seconds` on a daemon thread (what `loramux serve` and `loramux
    hub` do); setting the returned event stops it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_seconds):
            try:
                deleted = registry.collect_garbage()
            except Exception:  # a failed round must not end the collector: the next one tries again
                log.exception("collecting the registry's garbage failed")
                continue
            if deleted:
                log.info("collected %d unreferenced file(s) from the registry", deleted)

    threading.Thread(target=loop, name="registry-gc", daemon=True).start()
    return stop


def _apply(tree: dict[str, FileEntry], op: AddFile | DeleteFile) -> None:
    if isinstance(op, AddFile):
        tree[op.path] = FileEntry(op.path, op.sha256, op.size)
        return
    path = op.path.rstrip("/")
    removed = [p for p in tree if p == path or p.startswith(path + "/")] if op.folder else [path] * (path in tree)
    # Deleting what is already gone is not an error: two concurrent pushes may both remove an old file.
    for p in removed:
        del tree[p]


def _commit_id(repo_id: str, head: Revision | None, tree: dict[str, FileEntry], message: str) -> str:
    # Unique per push even for identical content: concurrent identical pushes are distinct revisions.
    body = json.dumps(
        [repo_id, head.commit if head else None, sorted((e.path, e.sha256) for e in tree.values()), message,
         time.time_ns(), os.urandom(8).hex()]
    )  # fmt: skip
    return hashlib.sha1(body.encode()).hexdigest()


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
