"""`loramux serve` in single-user mode: no keys needed on loopback, refused elsewhere, 429 when its queue is full,
and a SIGTERM that lets a running stream end cleanly (finish reason, `[DONE]`) before the process exits 0."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from loadtests.tiny_model import make_tiny_checkpoint
from loramux.registry.registry import Registry
from tests.conftest import REPO
from tests.server.api.serving import launch, metric, serve_command

LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lifecycle") / "tiny", max_position_embeddings=2048)


def first_events(lines, count: int) -> list[dict]:
    events = []
    for line in lines:
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
        if len(events) == count:
            return events
    return events


def test_no_keys_refuses_a_public_address_unless_told(tmp_path):
    refused = subprocess.run(
        serve_command("--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")), cwd=REPO, capture_output=True,
        text=True, timeout=120, env={"LORAMUX_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.startswith("loramux serve: error: refusing to listen on 0.0.0.0 with no API keys")
    assert "--allow-insecure-no-auth" in refused.stderr
    assert not Registry.open(tmp_path / "data").store.has_keys()


def test_single_user_queue_full_and_graceful_sigterm(base, tmp_path):
    server = launch(
        tmp_path / "home", "--base", str(base), "--data-dir", str(tmp_path / "data"),
        "--max-num-seqs", "1", "--max-queue", "0", "--shutdown-grace", "1",
    )  # fmt: skip
    try:
        llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)
        assert [m.id for m in llm.models.list().data] == ["tiny"]  # single-user: no key needed
        done = llm.completions.create(model="tiny", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 3  # (without ignore_eos the random model may sample its EOS first)

        with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, timeout=120) as running:
            lines = running.iter_lines()
            assert first_events(lines, 2)[0]["choices"][0]["finish_reason"] is None
            # The engine holds one request and queues none: the next one is told to come back later.
            with pytest.raises(openai.RateLimitError) as overloaded:
                llm.completions.create(model="tiny", prompt="hi", max_tokens=3)
            assert overloaded.value.response.headers["retry-after"] == "1"
            assert overloaded.value.body["type"] == "rate_limit_error"

            # SIGTERM mid-stream: the stream still ends with a finish reason and [DONE], the server exits 0.
            exit_status: list[int] = []
            stopper = threading.Thread(target=lambda: exit_status.append(server.stop()))
            stopper.start()
            rest = [line for line in lines if line.startswith("data:")]
        stopper.join(timeout=120)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "abort"
        assert exit_status == [0], server.output()
        log = server.output()
        assert "aborting 1 requests still running after the grace period" in log and "engine stopped" in log
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health")
    finally:
        server.stop()


def engine_process(server) -> psutil.Process:
    """The engine process of a `loramux serve` (its child running the step loop)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(server.process.pid).children(recursive=True):
            if "loramux-engine" in " ".join(child.cmdline()) or child.name() == "loramux-engine":
                return child
        # spawn's children run `python -c "from multiprocessing.spawn import spawn_main ..."`: the engine is the one
        # that is neither the resource tracker nor an adapter reader
        spawned = [c for c in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        if spawned:
            return spawned[0]
        time.sleep(0.2)
    raise AssertionError("no engine process found")


def test_an_engine_process_that_dies_ends_the_streams_and_the_server_says_so(base, tmp_path):
    server = launch(tmp_path / "home", "--base", str(base), "--data-dir", str(tmp_path / "data"))
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, timeout=60) as running:
            lines = running.iter_lines()
            assert first_events(lines, 2)[0]["choices"][0]["finish_reason"] is None
            engine_process(server).kill()
            rest = [line for line in lines if line.startswith("data:")]  # ends: no hang
        assert "error" in json.loads(rest[-1][5:]) and "engine" in json.loads(rest[-1][5:])["error"]["message"]
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 503
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "engine_stopped"
        assert server.process.poll() is None  # the server stays up to say so
    finally:
        assert server.stop() == 0, server.output()


def test_several_api_processes_serve_one_engine(base, tmp_path):
    server = launch(
        tmp_path / "home", "--base", str(base), "--data-dir", str(tmp_path / "data"), "--api-servers", "2"
    )  # fmt: skip
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}

        def ask(_: int) -> dict:
            with httpx.Client(timeout=60) as client:  # a connection each: the kernel spreads them over the processes
                return client.post(f"{server.url}/v1/completions", json=body).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(24)))
        assert {a["choices"][0]["text"] for a in answers} == {answers[0]["choices"][0]["text"]}  # greedy: the same
        assert all(a["usage"]["completion_tokens"] == 4 for a in answers)
        workers = [c for c in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) >= 3  # the engine and two API processes
        text = httpx.get(f"{server.url}/metrics", timeout=10).text  # any process's scrape adds up all of them
        assert metric(text, "loramux_requests_total", endpoint="completions", status="200") == 24
        assert metric(text, "loramux_kv_blocks_used") == 0
    finally:
        assert server.stop() == 0, server.output()
