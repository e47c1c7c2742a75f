"""Talking to a hub (loramux or huggingface.co) through `huggingface_hub`'s HfApi: what `adapters push/pull/ls/
show/rm` do. Imports huggingface_hub only when called, never torch."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loramux.core.validate import AdapterSummary, adapter_files_in, validate_adapter_files

DEFAULT_HUB = "http://127.0.0.1:8000"
HF_HUB = "https://huggingface.co"


class HubClientError(ValueError):
    """A hub refused a request or could not be reached; the message is the hub's own, on one line."""


def hub_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("LORAMUX_HUB") or DEFAULT_HUB).rstrip("/")


def hub_token(explicit: str | None) -> str | None:
    return explicit or os.environ.get("LORAMUX_TOKEN") or os.environ.get("HF_TOKEN") or None


def hub_api(url: str, token: str | None):
    """An HfApi for `url`. Towards a loramux hub, uploads go through LFS rather than Xet (which loramux hubs also
    answer): no xorbs are kept on the hub for them, and hubs older than their Xet routes work too."""
    if url != HF_HUB:
        use_lfs_uploads()
        _check_reachable(url)
    from huggingface_hub import HfApi

    return HfApi(endpoint=url, token=token or False)


def use_lfs_uploads() -> None:
    """Turn huggingface_hub's Xet uploads off for this process, whether or not it is imported yet: the variable is
    read once, at its import (some command may have imported it already, through transformers), and the constant it
    sets is what every upload checks."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_DISABLE_XET = True


def call(what: str, url: str, fn, *args, **kwargs):
    """Run one HfApi call, turning its HTTP and connection errors into a one-line HubClientError."""
    from huggingface_hub.errors import HfHubHTTPError

    try:  # huggingface_hub 2.x talks through httpx2
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError

    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as exc:
        message = exc.server_message or str(exc).strip().splitlines()[0]
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubClientError(f"{what} failed ({status}): {' '.join(message.split())}") from exc
    except TransportError as exc:
        raise HubClientError(f"cannot reach the hub at {url} ({exc}); is `loramux hub` running?") from exc


def _check_reachable(url: str) -> None:
    """Fail at once when nothing listens (the client would retry for half a minute)."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), 5).close()
    except OSError as exc:
        reason = exc.strerror or exc
        raise HubClientError(f"cannot reach the hub at {url} ({reason}); is `loramux hub` running?") from exc


@dataclass
class PushResult:
    repo_id: str
    commit: str
    summary: AdapterSummary


def push(directory: Path, repo_id: str, url: str, token: str | None, private: bool, message: str) -> PushResult:
    """Validate DIR as an adapter, then make it the newest revision of REPO (files not in DIR are removed)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = adapter_files_in(directory)
    summary = validate_adapter_files(files)
    api = hub_api(url, token)
    with new_repo_removed_on_failure(api, url, repo_id, private=private, repo_type="model"):
        info = call("reading the repo", url, api.model_info, repo_id)
        stale = [
            s.rfilename for s in info.siblings or [] if s.rfilename not in files and s.rfilename != ".gitattributes"
        ]
        operations = [CommitOperationAdd(path, str(local)) for path, local in files.items()]
        operations += [CommitOperationDelete(path) for path in stale]
        commit = call("uploading", url, api.create_commit, repo_id, operations=operations, commit_message=message)
    return PushResult(repo_id, commit.oid, summary)


@contextlib.contextmanager
def new_repo_removed_on_failure(api, url: str, repo_id: str, **create) -> Iterator[None]:
    """Create `repo_id` if it does not exist; if it was created here and the block fails, delete it again, so that
    a failed first push leaves no empty repo behind."""
    existed = call("reading the repo", url, api.repo_exists, repo_id)
    call("creating the repo", url, api.create_repo, repo_id, exist_ok=True, **create)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(Exception):  # the push's own error is the one to report
                api.delete_repo(repo_id)
        raise


def pull(repo_id: str, url: str, token: str | None, revision: str | None, to: Path | None) -> Path:
    from huggingface_hub import snapshot_download

    target = Path(to) if to else Path.cwd() / repo_id.split("/")[-1]
    api = hub_api(url, token)  # sets up the environment before the download
    del api
    path = call(
        "downloading", url, snapshot_download, repo_id, revision=revision, local_dir=target, endpoint=url,
        token=token or False,
    )  # fmt: skip
    # huggingface_hub keeps its download bookkeeping in DIR/.cache/huggingface (to resume an interrupted download);
    # once the download is complete the target holds the adapter's files alone.
    shutil.rmtree(target / ".cache" / "huggingface", ignore_errors=True)
    with contextlib.suppress(OSError):
        (target / ".cache").rmdir()  # only if nothing else is in it
    return Path(path)
