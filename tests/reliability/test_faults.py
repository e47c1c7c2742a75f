"""Faults the server must survive: a client gone mid-stream, a request storm past the queue, a blob corrupted on disk,
the disk filling during a push, and a crash followed by a restart on the same data directory."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from tests.conftest import make_tiny_checkpoint
from tests.reliability.conftest import push, start_tiny_server, write_adapter
from tests.server.api.serving import launch, metric

LONG_STREAM = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}


def engine_gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    names = ("requests_running", "requests_waiting", "kv_blocks_used", "slots_used")
    return {name: metric(text, f"loramux_{name}") for name in names}


def wait_until_idle(url: str, timeout: float = 30) -> dict[str, float]:
    """The engine gauges once nothing runs, waits or holds a KV block or a slot (or the last reading at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = engine_gauges(url)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


def chat(url: str, model: str = "tiny", max_tokens: int = 6) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """A tiny server with a long context, 2 sequences per batch and 2 more queued: easy to fill."""
    root = tmp_path_factory.mktemp("busy")
    base = make_tiny_checkpoint(root / "tiny", max_position_embeddings=2048)
    server = launch(root / "home", "--base", str(base), "--data-dir", str(root / "data"),
                    "--max-num-seqs", "2", "--max-queue", "2")  # fmt: skip
    yield server
    assert server.process.poll() is None, server.output()
    assert server.stop() == 0, server.output()


def test_a_client_that_disconnects_mid_stream_aborts_its_generation(busy_server):
    url = busy_server.url
    before = metric(httpx.get(f"{url}/metrics").text, "loramux_requests_aborted_total", reason="disconnect")
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=60) as stream:
        events = 0
        for line in stream.iter_lines():
            events += line.startswith("data:")
            if events == 3:
                break  # leave with ~1,500 tokens still to generate
    # Gone without reading the rest: the engine stops generating for it and frees its blocks.
    assert wait_until_idle(url) == dict.fromkeys(("requests_running", "requests_waiting", "kv_blocks_used",
                                                  "slots_used"), 0.0)  # fmt: skip
    after = metric(httpx.get(f"{url}/metrics").text, "loramux_requests_aborted_total", reason="disconnect")
    assert after == before + 1
    generated = metric(httpx.get(f"{url}/metrics").text, "loramux_generation_tokens_total", tenant="local",
                       adapter="base")  # fmt: skip
    assert generated < 1500  # it did not run to the end behind the client's back
    assert chat(url).status_code == 200  # and the server carries on


def test_a_request_storm_past_the_queue_gets_clean_429s_and_the_server_recovers(busy_server):
    url = busy_server.url
    body = {**LONG_STREAM, "stream": False, "max_tokens": 300}

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(24)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 429}, statuses  # no 5xx, no dropped connection
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 24 - 8, statuses  # at most 2 running + 2 queued at a time, each taking a while
    for answer in refused:
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]["type"] == "rate_limit_error"
    for answer in answers:
        if answer.status_code == 200:
            assert answer.json()["usage"]["completion_tokens"] == 300
    assert busy_server.process.poll() is None
    assert wait_until_idle(url)["requests_running"] == 0
    assert chat(url).status_code == 200  # recovered: the next request is served at once
    assert httpx.get(f"{url}/ready").status_code == 200


def test_a_corrupted_blob_is_never_served_and_the_adapter_is_refused_clearly(tiny_server, tmp_path):
    url, api = tiny_server.url, tiny_server.api
    push(api, write_adapter(tmp_path / "victim", seed=3), "local/victim")
    sha = next(s.blob_id for s in api.model_info("local/victim", files_metadata=True).siblings
               if s.rfilename == "adapter_model.safetensors")  # fmt: skip
    blob = tiny_server.data / "blobs" / sha[:2] / sha[2:]
    data = bytearray(blob.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN where a weight was: same size, other content
    blob.write_bytes(bytes(data))

    download = httpx.get(f"{url}/local/victim/resolve/main/adapter_model.safetensors")
    assert download.status_code == 500 and "corrupted" in download.json()["error"]
    assert bytes(data) not in download.content
    with pytest.raises(HfHubHTTPError):
        hf_hub_download("local/victim", "adapter_model.safetensors", endpoint=url, local_dir=tmp_path / "dl")
    assert not (tmp_path / "dl" / "adapter_model.safetensors").exists()

    for _ in range(2):  # the same clear answer each time, not a crash or a loop
        answer = chat(url, "local/victim")
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["code"] == "adapter_damaged" and "corrupted" in error["message"] and "push it again" in error[
            "message"]  # fmt: skip
    assert chat(url).status_code == 200  # the base and the server are unaffected
    assert tiny_server.server.process.poll() is None


class _FullDisk:
    """Stands in for the `os` module of the blob store: files it opens for writing take `room` bytes in all, then
    fail with ENOSPC as a full filesystem would."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fdopen(self, fd: int, mode: str = "r", *args, **kwargs):
        file = os.fdopen(fd, mode, *args, **kwargs)
        disk = self
        real_write = file.write

        def write(data: bytes) -> int:
            if len(data) > disk.room:
                disk.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.room -= len(data)
            return real_write(data)

        file.write = write
        return file


@pytest.mark.parametrize("route", ["commit", "xet"])
def test_a_disk_filling_during_a_push_is_a_clean_507_with_no_partial_revision(hub, hub_client_env, monkeypatch,
                                                                              tmp_path, route):  # fmt: skip
    import loramux.registry.blobs as blobs

    adapter = write_adapter(tmp_path / "adapter", seed=5)
    # A model card of 2 MiB goes through Xet (the client has hf_xet): the hub rebuilds it from its xorbs into the blob
    # store when the shard comes; small files ride in the commit.
    (adapter / "README.md").write_text("card\n" * ((2 << 20) // 5) if route == "xet" else "card\n")
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/full")
    first = push(api, write_adapter(tmp_path / "v1", seed=4), "me/full")

    monkeypatch.setattr(blobs, "os", _FullDisk(room=1000))  # the config fits, the weights do not
    with pytest.raises(Exception) as failed:
        push(api, adapter, "me/full")
    if route == "xet":  # hf_xet reports the CAS's answer in its own error
        assert "507 Insufficient Storage" in str(failed.value), failed.value
    else:
        full = failed.value
        assert isinstance(full, HfHubHTTPError), failed.value
        assert full.response.status_code == 507
        assert "disk is full" in full.response.json()["error"]
    assert api.model_info("me/full").sha == first  # the earlier revision is still the head, nothing half-made
    assert [c.commit_id for c in api.list_repo_commits("me/full")] == [first]
    assert list((hub.data_dir / "blobs" / "tmp").iterdir()) == []  # no partial upload left behind

    monkeypatch.setattr(blobs, "os", os)  # space freed: the push goes through whole
    (adapter / "README.md").write_text("card\n")  # (a small card: uploads to the in-process hub are slow here)
    second = push(api, adapter, "me/full")
    assert api.model_info("me/full").sha == second != first
    local = hf_hub_download("me/full", "adapter_model.safetensors", endpoint=hub.url, local_dir=tmp_path / "dl")
    assert Path(local).read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_a_crashed_server_restarts_on_its_data_dir_with_every_adapter_and_revision(tmp_path, hub_client_env):
    server = start_tiny_server(tmp_path)
    api = HfApi(endpoint=server.url, token="single-user")
    try:
        revisions = [push(api, write_adapter(tmp_path / f"a{seed}", seed=seed, scale=0.5), "local/kept")
                     for seed in (1, 2)]  # fmt: skip
        other = push(api, write_adapter(tmp_path / "b", targets=("o_proj", "down_proj"), scale=0.5), "local/other")
        models = [f"local/kept@{revisions[0]}", f"local/kept@{revisions[1]}", "local/kept", "local/other"]
        answers = {m: chat(server.url, m, max_tokens=8).json()["choices"][0]["message"]["content"] for m in models}
        assert answers[models[0]] != answers[models[1]] == answers["local/kept"]  # two revisions, served apart
        server.process.kill()  # a crash: no graceful shutdown
        server.process.wait()
    finally:
        server.stop()

    server = start_tiny_server(tmp_path)
    try:
        api = HfApi(endpoint=server.url, token="single-user")
        assert api.model_info("local/kept").sha == revisions[1]
        assert {c.commit_id for c in api.list_repo_commits("local/kept")} == set(revisions)
        assert api.model_info("local/other").sha == other
        listed = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert {"local/kept", "local/other"} <= listed
        for model, text in answers.items():  # every revision still there and served as before
            answer = chat(server.url, model, max_tokens=8)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == text
        config = hf_hub_download("local/kept", "adapter_config.json", revision=revisions[0], endpoint=server.url,
                                 local_dir=tmp_path / "old")  # fmt: skip
        old = json.loads(Path(config).read_text())
        assert old["r"] == 4
    finally:
        assert server.stop() == 0, server.output()
