"""The two adapter sources the engine and the merge command resolve names with: the local registry, and a remote
hub (loramux or huggingface.co). Both hand out a directory per immutable commit, checked against sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from loramux.core import paths
from loramux.core.adapter_source import AdapterNotFoundError, AdapterRef, ResolvedAdapter
from loramux.registry.names import InvalidNameError
from loramux.registry.registry import Registry, RepoNotFoundError, RevisionNotFoundError

COMPLETE = ".complete"  # written last: a directory without it is an interrupted copy and is made again
_PUBLISH = threading.Lock()  # one publish at a time in this process (see `_publish`)


class RegistrySource:
    """Adapters of a local registry, laid out once per commit in `cache_dir` (hard links to the blob store's files
    where the file system allows, copies elsewhere)."""

    def __init__(self, registry: Registry, cache_dir: Path | None = None) -> None:
        self.registry = registry
        self.cache_dir = Path(cache_dir) if cache_dir else paths.home() / "cache" / "registry"

    def resolve(self, ref: AdapterRef, tenant: str | None) -> ResolvedAdapter:
        caller = self.registry.caller_for_tenant(tenant)
        try:
            repo = self.registry.repo(ref.repo, caller)
            revision = self.registry.revision(repo, ref.revision)
        except (RepoNotFoundError, RevisionNotFoundError, InvalidNameError) as exc:
            raise AdapterNotFoundError(f"adapter {ref} not found") from exc
        if revision.kind != "adapter":
            raise AdapterNotFoundError(f"{ref} is a model repo, not an adapter")
        target = self.cache_dir / repo.namespace / repo.name / revision.commit
        if not (target / COMPLETE).exists():
            # `blob_path` hands out blobs it has just checked against their sha256: the copies are not hashed again
            files = {e.path: (self.registry.blob_path(e), None) for e in self.registry.files(revision)}
            _materialize(target, files)
        return ResolvedAdapter(repo=ref.repo, commit=revision.commit, path=target)


def registry_source(
    data_dir: Path | None, database_url: str | None = None, blob_url: str | None = None
) -> RegistrySource:
    """The source of the registry `Registry.open` finds with these settings, opened here (a picklable factory for
    another process: the engine's)."""
    return RegistrySource(Registry.open(data_dir, database_url, blob_url))


class HubSource:
    """Adapters of a remote hub, pulled once per commit into a cache under LORAMUX_HOME and checked by sha256."""

    def __init__(self, url: str, token: str | None = None, cache_dir: Path | None = None) -> None:
        self.url, self.token = url.rstrip("/"), token
        self.cache_dir = Path(cache_dir) if cache_dir else paths.home() / "cache" / "hub"

    def resolve(self, ref: AdapterRef, tenant: str | None) -> ResolvedAdapter:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        from loramux.registry.client import hub_api

        api = hub_api(self.url, self.token)
        try:
            info = api.model_info(ref.repo, revision=ref.revision, files_metadata=True)
        except HfHubHTTPError as exc:
            raise AdapterNotFoundError(f"adapter {ref} not found at {self.url}") from exc
        target = self.cache_dir / _host(self.url) / ref.repo / info.sha
        if (target / COMPLETE).exists():
            return ResolvedAdapter(repo=ref.repo, commit=info.sha, path=target)
        with tempfile.TemporaryDirectory(prefix="pull-", dir=_mkdir(self.cache_dir)) as tmp:
            files = {}
            for sibling in info.siblings or []:
                local = hf_hub_download(
                    ref.repo, sibling.rfilename, revision=info.sha, endpoint=self.url, token=self.token,
                    local_dir=Path(tmp) / "download",
                )  # fmt: skip
                files[sibling.rfilename] = (Path(local), _expected_digest(sibling))
            _materialize(target, files)
        return ResolvedAdapter(repo=ref.repo, commit=info.sha, path=target)


def resolve_adapter_argument(text: str, hub_url: str, token: str | None) -> ResolvedAdapter:
    """What a command-line ADAPTER argument names: a local PEFT adapter directory as it is, or NS/NAME[@REV] pulled
    from the hub at `hub_url`. Raises ValueError (a one-line message) when it is neither, or not found."""
    path = Path(text).expanduser()
    if path.is_dir():
        return ResolvedAdapter(repo=str(path.absolute()), commit="local", path=path)
    try:
        ref = AdapterRef.parse(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither an adapter directory nor an adapter name (ns/name[@revision])") from exc
    try:
        return HubSource(hub_url, token).resolve(ref, None)
    except AdapterNotFoundError as exc:
        raise ValueError(f"adapter {ref} not found on {hub_url} (or not readable with this token)") from exc


def _expected_digest(sibling) -> str | None:
    """The file's sha256 as the hub states it: LFS files carry it; loramux's blob ids are sha256 too."""
    if sibling.lfs is not None:
        return sibling.lfs.sha256
    if sibling.blob_id and len(sibling.blob_id) == 64:
        return sibling.blob_id
    return f"git:{sibling.blob_id}" if sibling.blob_id else None


def _materialize(target: Path, files: dict[str, tuple[Path, str | None]]) -> None:
    """Place `files` ({repo path: (source, expected digest)}) in `target` (`_place`), checking each against its
    digest where one is given, then publish the directory with one rename so that readers never see half of it."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mkdir(target.parent)))
    try:
        for rel, (source, expected) in files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _place(source, dest)
            if expected is not None and _digest(dest, expected) != expected:
                raise OSError(f"{rel}: downloaded content does not match its checksum {expected}")
        (tmp / COMPLETE).write_text("")
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _place(source: Path, dest: Path) -> None:
    """A hard link to `source` at `dest`, or a copy where the file system refuses one (another device, no links).

    The sources are never written again (the blob store's content-addressed files, or a pull's own download), so a
    link gives the engine the same bytes as a copy without writing them again: an adapter's first request does not
    wait for its weights to be copied, and the cache holds no second copy of them."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished copy `tmp` to `target`. Two resolvers of one commit (the engine reads several adapters at
    once) may both find it missing and both copy it: the first copy published stays, since a reader may already be
    in it, and the later one is dropped. Only an interrupted copy (no COMPLETE marker) is replaced."""
    with _PUBLISH:
        if (target / COMPLETE).exists():
            return  # published meanwhile; the caller removes `tmp`
        if target.exists():
            shutil.rmtree(target)  # an interrupted earlier copy
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / COMPLETE).exists():  # not another process publishing the same commit first
                raise


def _digest(path: Path, expected: str) -> str:
    data = path.read_bytes()
    if expected.startswith("git:"):  # a git blob id, as huggingface.co gives for small files
        return "git:" + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _host(url: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in url.split("://", 1)[-1])


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
