"""Several `loramux hub` processes on one registry (PostgreSQL + S3), as users run them: every push through any of
them is seen by all of them at the next request, and concurrent pushes through both all land, whole and in order."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.hf_api import RepoFile

from loramux.registry.jobs import new_id
from loramux.registry.store import FineTuningJob
from tests.conftest import REPO, free_port
from tests.server.api.serving import Server

PUSHERS_PER_HUB, PUSHES_PER_HUB = 2, 50


def launch_hub(home: Path, storage, *args: str, timeout: float = 60) -> Server:
    """`loramux hub` in a process of its own on `storage` (its options come from LORAMUX_* variables, as a deployment
    would set them), with a local cache in `home/data`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    env.update(storage.env, LORAMUX_HOME=str(home))
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"hub-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "loramux.cli", "hub", "--port", str(port), "--data-dir", str(home / "data"), *args],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    hub = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loramux hub exited with {process.returncode}:\n{hub.output()}")
        try:
            httpx.get(f"{hub.url}/api/models", timeout=2)
            return hub
        except httpx.TransportError:
            time.sleep(0.1)
    hub.stop()
    raise RuntimeError(f"loramux hub did not start within {timeout}s:\n{hub.output()}")


@pytest.fixture
def hub_client(monkeypatch):
    """huggingface_hub in this process may talk to the local hubs (the session is offline otherwise), without Xet."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def two_hubs(shared_storage, tmp_path, hub_client):
    hubs = [launch_hub(tmp_path / f"hub{i}", shared_storage) for i in range(2)]
    yield hubs
    for hub in hubs:
        assert hub.stop() == 0, hub.output()


def test_concurrent_pushes_through_two_hubs_all_land_whole_and_in_order(two_hubs, make_adapter, tmp_path):
    apis = [HfApi(endpoint=hub.url) for hub in two_hubs]
    adapter = make_adapter()
    apis[0].create_repo("me/shared")
    first = apis[0].upload_folder(folder_path=str(adapter), repo_id="me/shared", commit_message="adapter").oid
    assert apis[1].model_info("me/shared").sha == first  # pushed through one, served by the other at once

    # Each pusher rewrites a note of its own: a revision built on a stale head would lose another pusher's latest note.
    pushed: dict[str, tuple[str, bytes]] = {}  # commit -> (the note it wrote, its content)
    order: dict[tuple[int, int], list[str]] = {}  # (hub, pusher) -> its commits, in the order it made them
    errors: list[BaseException] = []
    start = threading.Barrier(2 * PUSHERS_PER_HUB, timeout=60)

    def push(hub: int, pusher: int) -> None:
        order[hub, pusher] = mine = []
        try:
            start.wait()
            for i in range(PUSHES_PER_HUB // PUSHERS_PER_HUB):
                path, content = f"notes/hub{hub}-pusher{pusher}.txt", f"push {i} of {hub}/{pusher}".encode()
                commit = (
                    apis[hub]
                    .upload_file(path_or_fileobj=content, path_in_repo=path, repo_id="me/shared", commit_message=path)
                    .oid
                )
                pushed[commit] = (path, content)
                mine.append(commit)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(h, p)) for h in range(2) for p in range(PUSHERS_PER_HUB)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(pushed) == 2 * PUSHES_PER_HUB

    # Listed by either hub: every push once (none lost, none doubled), after the first revision.
    history = [c.commit_id for c in apis[1].list_repo_commits("me/shared")][::-1]  # oldest first
    assert history == [c.commit_id for c in apis[0].list_repo_commits("me/shared")][::-1]
    assert history[0] == first and sorted(history[1:]) == sorted(pushed)
    position = {commit: i for i, commit in enumerate(history)}
    for commits in order.values():  # each pusher's pushes in the order it made them
        assert [position[c] for c in commits] == sorted(position[c] for c in commits)

    # Every revision whole: the one before it with its own note written, nothing more and nothing less.
    adapter_files = {p.name for p in adapter.iterdir()}
    notes: dict[str, bytes] = {}  # each note as it should be at this revision
    for i, commit in enumerate(history):
        if i:
            path, content = pushed[commit]
            notes[path] = content
        tree = apis[i % 2].list_repo_tree("me/shared", revision=commit, recursive=True)
        files = {e.path: e.blob_id for e in tree if isinstance(e, RepoFile)}
        assert set(files) == adapter_files | set(notes), f"revision {i}"
        assert {p: files[p] for p in notes} == {p: hashlib.sha256(c).hexdigest() for p, c in notes.items()}
    for i, commit in enumerate(history[1:], start=1):  # and each note's content, from the other hub's cache
        path, content = pushed[commit]
        local = hf_hub_download("me/shared", path, revision=commit, endpoint=two_hubs[i % 2].url,
                                local_dir=tmp_path / "notes" / commit)  # fmt: skip
        assert Path(local).read_bytes() == content


def test_keys_created_with_the_cli_work_on_every_hub(shared_storage, tmp_path, hub_client):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"} | shared_storage.env

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loramux.cli", *args, "--data-dir", str(tmp_path / "cli")],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    assert cli("tenants", "create", "acme").returncode == 0
    token = cli("keys", "create", "acme").stdout.splitlines()[0]
    hubs = [launch_hub(tmp_path / f"hub{i}", shared_storage) for i in range(2)]
    try:
        for hub in hubs:
            assert HfApi(endpoint=hub.url, token=token).whoami()["name"] == "acme"
            anonymous = httpx.post(f"{hub.url}/api/repos/create", json={"name": "x", "organization": "acme"})
            assert anonymous.status_code == 401  # keys exist: writes need one
        HfApi(endpoint=hubs[0].url, token=token).create_repo("acme/private", private=True)
        assert HfApi(endpoint=hubs[1].url, token=token).model_info("acme/private").private
        key_id = cli("keys", "list").stdout.split("\t")[0]
        assert cli("keys", "revoke", key_id).returncode == 0
        for hub in hubs:  # revoked through the database: refused by every hub at the next request
            response = httpx.get(f"{hub.url}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401
    finally:
        for hub in hubs:
            assert hub.stop() == 0, hub.output()


def test_a_training_worker_takes_its_jobs_from_the_shared_database(shared_storage, tmp_path):
    from loramux.registry.jobs import FineTuning
    from loramux.registry.registry import Caller

    env = {**os.environ, **shared_storage.env, "LORAMUX_HOME": str(tmp_path / "home")}
    worker = [sys.executable, "-m", "loramux.cli", "train-worker", "--once", "--data-dir", str(tmp_path / "worker")]
    idle = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=120)
    assert idle.returncode == 0, idle.stderr
    assert "waiting for fine-tuning jobs in the registry database" in idle.stdout

    # A job queued through another process's registry is claimed by the worker (which then fails it: the file names
    # a base model that does not exist), and the outcome is visible to the process that queued it.
    jobs = FineTuning(shared_storage.open(tmp_path / "api"))
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    upload = jobs.upload(Caller(local=True), "t.jsonl", "fine-tune", io.BytesIO(line * 2), max_bytes=1 << 20)
    job = FineTuningJob(
        id=new_id("ftjob"), tenant=None, model="missing", base=str(tmp_path / "no-such-base"),
        training_file=upload.id, validation_file=None, suffix=None, repo_id="local/x", settings={"epochs": 1},
        hyperparameters={}, seed=0, max_attempts=1,
    )  # fmt: skip
    jobs.create_job(Caller(local=True), job)
    ran = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    done = jobs.job(Caller(local=True), job.id)
    assert (done.status, done.attempts) == ("failed", 1) and done.error["message"] and done.worker is not None
