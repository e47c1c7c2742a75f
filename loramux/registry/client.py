"""Talking to a hub (loramux or huggingface.co) through `huggingface_hub`'s HfApi: what `adapters push/pull/ls/
show/rm` do. Imports huggingface_hub only when called, never torch."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loramux.adapters.validate import AdapterSummary, adapter_files_in, validate_adapter_files

DEFAULT_HUB = "http://127.0.0.1:8000"
HF_HUB = "https://huggingface.co"


class HubClientError(ValueError):
    """A hub refused a request or could not be reached; the message is the hub's own, on one line."""


def hub_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("LORAMUX_HUB") or DEFAULT_HUB).rstrip("/")


def hub_token(explicit: str | None) -> str | None:
    return explicit or os.environ.get("LORAMUX_TOKEN") or os.environ.get("HF_TOKEN") or None


def hub_api(url: str, token: str | None):
    # A loramux hub speaks the LFS upload protocol, not Xet; the variable is read when huggingface_hub loads.
    if url != HF_HUB:
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
        _check_reachable(url)
    from huggingface_hub import HfApi

    return HfApi(endpoint=url, token=token or False)


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
    call("creating the repo", url, api.create_repo, repo_id, private=private, exist_ok=True)
    info = call("reading the repo", url, api.model_info, repo_id)
    stale = [s.rfilename for s in info.siblings or [] if s.rfilename not in files and s.rfilename != ".gitattributes"]
    operations = [CommitOperationAdd(path, str(local)) for path, local in files.items()]
    operations += [CommitOperationDelete(path) for path in stale]
    commit = call("uploading", url, api.create_commit, repo_id, operations=operations, commit_message=message)
    return PushResult(repo_id, commit.oid, summary)


def pull(repo_id: str, url: str, token: str | None, revision: str | None, to: Path | None) -> Path:
    from huggingface_hub import snapshot_download

    target = Path(to) if to else Path.cwd() / repo_id.split("/")[-1]
    api = hub_api(url, token)  # sets up the environment before the download
    del api
    path = call(
        "downloading", url, snapshot_download, repo_id, revision=revision, local_dir=target, endpoint=url,
        token=token or False,
    )  # fmt: skip
    return Path(path)
