"""The load generator against a fake OpenAI-compatible streaming server (FastAPI + uvicorn in a thread on a free
loopback port) whose delays and failures the tests control and whose tally of what it did is the ground truth."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loadtests.loadgen import LoadConfig, check_target, main, run_load
from loadtests.workload import LengthDist, Tenant, Workload, poisson_arrivals, zipf_weights

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Behaviour:
    """How the fake server answers. `outcomes` maps an outcome to its probability; the rest succeed.
    Outcomes: http_500, http_429 (an OpenAI-shaped error body), disconnect (the connection drops mid-stream),
    stream_error (an error event mid-stream), hang (no token for `hang_s`)."""

    first_token_s: float = 0.0
    per_token_s: float = 0.0
    outcomes: dict[str, float] = field(default_factory=dict)
    usage: bool = True
    hang_s: float = 3.0
    seed: int = 0


class FakeServer:
    def __init__(self) -> None:
        self.url = ""
        self.reset()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/v1/completions")(self._completions)
        self.app.get("/health")(self._health)

    def reset(self, **behaviour: Any) -> None:
        self.behaviour = Behaviour(**behaviour)
        self.rng = random.Random(self.behaviour.seed)
        self.received: list[dict[str, Any]] = []  # one entry per request: path, key, body, outcome, client port
        self.health_ports: list[int] = []  # the client port of each GET /health

    def _outcome(self) -> str:
        roll, edge = self.rng.random(), 0.0
        for outcome, probability in self.behaviour.outcomes.items():
            edge += probability
            if roll < edge:
                return outcome
        return "ok"

    async def _health(self, request: Request) -> dict[str, str]:
        self.health_ports.append(request.client.port)
        return {"status": "ok"}

    async def _chat(self, request: Request) -> Any:
        return await self._answer(request, "chat")

    async def _completions(self, request: Request) -> Any:
        return await self._answer(request, "completions")

    async def _answer(self, request: Request, endpoint: str) -> Any:
        body = await request.json()
        outcome = self._outcome()
        key = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        self.received.append(
            {"endpoint": endpoint, "key": key, "body": body, "outcome": outcome, "port": request.client.port}
        )
        if outcome.startswith("http_"):
            status = int(outcome[5:])
            error = {"message": f"fake failure {status}", "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=status)
        return StreamingResponse(self._events(endpoint, body, outcome), media_type="text/event-stream")

    async def _events(self, endpoint: str, body: dict[str, Any], outcome: str) -> AsyncIterator[str]:
        b = self.behaviour
        n = int(body["max_tokens"])
        await asyncio.sleep(b.hang_s if outcome == "hang" else b.first_token_s)
        for i in range(n):
            if i:
                await asyncio.sleep(b.per_token_s)
            if i == n // 2 and outcome == "disconnect":
                raise RuntimeError("fake server drops the connection")
            if i == n // 2 and outcome == "stream_error":
                yield _sse({"error": {"message": "fake error mid-stream", "type": "server_error", "code": 500}})
                return
            text = f"w{i} "
            choice = {"index": 0, "delta": {"content": text}} if endpoint == "chat" else {"index": 0, "text": text}
            yield _sse({"choices": [choice]})
        yield _sse({"choices": [{"index": 0, "delta": {}, "text": "", "finish_reason": "length"}]})
        if b.usage and body.get("stream_options", {}).get("include_usage"):
            yield _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}})
        yield "data: [DONE]\n\n"

    def tally(self) -> Counter[str]:
        """What the server did, in the load generator's error kinds."""
        kinds = {"ok": "ok", "hang": "timeout"}
        return Counter(kinds.get(r["outcome"], r["outcome"]) for r in self.received)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    fake = FakeServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with another process
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield fake
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server


def run_cli(server: FakeServer, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "report.json"
    rc = main(["--url", server.url, "--json", str(out), *args])
    return rc, json.loads(out.read_text())


def assert_ordered(summary: dict[str, Any]) -> None:
    assert summary["count"] > 0
    assert 0 <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_fixed_concurrency_run_counts_latencies_json_and_png(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.reset(first_token_s=0.02, per_token_s=0.002)
    rc, report = run_cli(
        server,
        tmp_path,
        *("--model", "acme/support", "--api-key", "acme=sk-secret-acme", "--concurrency", "4", "--requests", "40"),
        *("--prompt-words", "5", "--max-tokens", "6"),
    )
    assert rc == 0
    assert report["requests"] == {"sent": 40, "completed": 40, "failed": 0, "dropped": 0, "without_usage": 0}
    assert report["errors"] == {}
    assert report["tokens"]["output"] == 40 * 6

    # The server saw exactly what the generator says it sent, in the OpenAI streaming shape.
    assert len(server.received) == 40
    for got in server.received:
        body = got["body"]
        assert got["endpoint"] == "chat" and got["key"] == "sk-secret-acme"
        assert body["model"] == "acme/support" and body["max_tokens"] == 6
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert len(body["messages"][0]["content"].split()) == 5

    lat = report["latency_s"]
    for name in ("ttft", "tpot", "e2e"):
        assert_ordered(lat[name])
    assert lat["ttft"]["p50"] >= 0.02  # the server waits 20 ms before the first token
    assert lat["ttft"]["max"] <= lat["e2e"]["max"]
    assert all(s["ttft_s"] <= s["e2e_s"] for s in report["samples"])
    assert report["throughput"]["requests_per_s"] > 0 and report["throughput"]["output_tokens_per_s"] > 0

    # JSON shape: config without secrets, shares, a consistent timeline, one sample per request.
    assert report["config"]["arrival"] == {"mode": "concurrency", "concurrency": 4}
    assert report["interrupted"] is False
    assert report["config"]["tenants"] == ["acme"]
    assert "sk-secret-acme" not in (tmp_path / "report.json").read_text()
    assert report["tenants"]["acme"] == {"sent": 40, "completed": 40, "failed": 0, "output_tokens": 240, "share": 1.0}
    assert sorted(s["index"] for s in report["samples"]) == list(range(40))
    line = report["timeline"]
    assert len(line["t_s"]) == len(line["requests_per_s"]) == len(line["output_tokens_per_s"]) == len(line["errors"])
    assert sum(line["requests_per_s"]) * line["bin_s"] == pytest.approx(40)
    assert sum(line["output_tokens_per_s"]) * line["bin_s"] == pytest.approx(240)

    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1000, 700)
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "report.png").shape[:2] == (700, 1000)  # decodes in full
    assert "40 sent, 40 completed, 0 failed" in capsys.readouterr().out


def test_errors_are_counted_by_kind(server: FakeServer, tmp_path: Path) -> None:
    outcomes = {"http_500": 0.15, "http_429": 0.1, "disconnect": 0.1, "stream_error": 0.1, "hang": 0.1}
    server.reset(outcomes=outcomes, seed=3)
    rc, report = run_cli(
        server,
        tmp_path,
        *("--model", "m", "--concurrency", "8", "--requests", "60", "--max-tokens", "4", "--timeout", "0.5"),
        "--fail-on-errors",
    )
    assert rc == 1  # --fail-on-errors and some requests failed
    tally = server.tally()
    assert set(tally) == {"ok", "http_500", "http_429", "disconnect", "stream_error", "timeout"}
    ok = tally.pop("ok")
    assert report["errors"] == dict(tally)
    assert report["requests"]["completed"] == ok
    assert report["requests"]["failed"] == sum(tally.values()) == 60 - ok
    assert report["tenants"]["anonymous"]["failed"] == 60 - ok
    assert report["error_examples"]["http_500"] == "fake failure 500"
    assert report["error_examples"]["stream_error"] == "fake error mid-stream"
    assert {s["status"] for s in report["samples"] if s["error"] == "http_429"} == {429}
    assert report["latency_s"]["e2e"]["count"] == ok  # latencies only over completed requests
    assert sum(report["timeline"]["errors"]) == 60 - ok


def test_unreachable_server_is_a_connect_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    out = tmp_path / "r.json"
    url = f"http://127.0.0.1:{port}"
    rc = main(["--url", url, "--model", "m", "--concurrency", "2", "--requests", "3", "--json", str(out), "--no-plot"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["errors"] == {"connect": 3} and report["requests"]["completed"] == 0
    assert report["latency_s"]["ttft"] == {"count": 0, "mean": None, "max": None, "p50": None, "p90": None, "p99": None}
    assert not (tmp_path / "r.png").exists()


def test_poisson_arrivals_split_tenants_and_zipf_adapters(server: FakeServer, tmp_path: Path) -> None:
    models = [f"ns/adapter-{i}" for i in range(5)]
    rc, report = run_cli(
        server,
        tmp_path,
        *("--model", ",".join(models), "--zipf", "1.2", "--rate", "150", "--requests", "200", "--max-tokens", "2"),
        *("--api-key", "a=key-a", "--api-key", "b=key-b", "--api-key", "c=key-c", "--tenant-weights", "2,1,1"),
        "--no-plot",
    )
    assert rc == 0 and report["requests"]["sent"] == 200 and report["requests"]["completed"] == 200
    assert report["config"]["arrival"] == {"mode": "poisson", "rate": 150.0}

    # The report's per-tenant and per-adapter counts are what the server received.
    by_key = Counter(r["key"] for r in server.received)
    assert {name: t["sent"] for name, t in report["tenants"].items()} == {
        "a": by_key["key-a"],
        "b": by_key["key-b"],
        "c": by_key["key-c"],
    }
    by_model = Counter(r["body"]["model"] for r in server.received)
    assert {name: m["sent"] for name, m in report["models"].items()} == {m: by_model[m] for m in models}

    tenant_shares = {name: t["share"] for name, t in report["tenants"].items()}
    assert sum(tenant_shares.values()) == pytest.approx(1.0)
    assert tenant_shares["a"] == pytest.approx(0.5, abs=0.08)
    assert tenant_shares["b"] == pytest.approx(0.25, abs=0.08) and tenant_shares["c"] == pytest.approx(0.25, abs=0.08)
    model_shares = [report["models"][m]["share"] for m in models]
    expected = zipf_weights(5, 1.2)
    assert model_shares[0] == pytest.approx(expected[0], abs=0.08)
    assert model_shares[0] > model_shares[1] > model_shares[4]


def test_stops_at_the_duration_and_cancels_what_hangs(server: FakeServer, tmp_path: Path) -> None:
    server.reset(outcomes={"hang": 1.0}, hang_s=5.0)
    config = LoadConfig(
        url=server.url,
        workload=Workload(["m"], [Tenant("t", None)], LengthDist.parse("3"), LengthDist.parse("4")),
        rate=20.0,
        duration_s=0.5,
        timeout_s=30.0,
        drain_s=0.3,
    )
    report = asyncio.run(run_load(config))
    sent = report["requests"]["sent"]
    assert sent >= 1 and report["errors"] == {"cancelled": sent} and report["requests"]["completed"] == 0
    assert all(s["start_s"] < 0.5 for s in report["samples"])  # nothing starts after the duration
    assert report["wall_s"] < 0.5 + 0.3 + 3.0  # a bound, not a measurement: the server would hang for 5 s

    # Closed loop: one request per worker, then the duration ends and the drain cancels them.
    server.reset(outcomes={"hang": 1.0}, hang_s=5.0)
    rc, report = run_cli(
        server, tmp_path, "--model", "m", "--concurrency", "3", "--duration", "0.3", "--drain", "0.2", "--no-plot"
    )
    assert rc == 0 and report["requests"]["sent"] == 3 and report["errors"] == {"cancelled": 3}


def test_completions_endpoint_extra_body_and_servers_without_usage(server: FakeServer, tmp_path: Path) -> None:
    server.reset(usage=False)
    rc, report = run_cli(
        server,
        tmp_path,
        *("--endpoint", "completions", "--model", "m", "--concurrency", "2", "--requests", "6"),
        *("--max-tokens", "uniform:2,5", "--prompt-words", "lognormal:8,0.5,20", "--ignore-eos"),
        *("--extra-body", '{"temperature": 0}', "--no-plot"),
    )
    assert rc == 0 and report["requests"]["completed"] == 6 and report["requests"]["without_usage"] == 6
    for got in server.received:
        body = got["body"]
        assert got["endpoint"] == "completions" and isinstance(body["prompt"], str) and "messages" not in body
        assert body["ignore_eos"] is True and body["temperature"] == 0 and 2 <= body["max_tokens"] <= 5
        assert 1 <= len(body["prompt"].split()) <= 20
    # Without usage the output tokens are the streamed text chunks: one per token here.
    assert report["tokens"]["output"] == sum(r["body"]["max_tokens"] for r in server.received)


def test_refuses_non_loopback_targets_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    for url in ("http://127.0.0.1:8000", "http://localhost:9/v1", "http://127.3.2.1", "http://[::1]:8000"):
        assert check_target(url, allow_remote=False).startswith("http")
    assert check_target("http://localhost:9/v1/", allow_remote=False) == "http://localhost:9"
    for url in ("http://10.0.0.1:8000", "https://api.example.com", "http://192.168.1.2"):
        with pytest.raises(ValueError, match="not a loopback address"):
            check_target(url, allow_remote=False)
        assert check_target(url, allow_remote=True).startswith("http")
    with pytest.raises(ValueError, match="http"):
        check_target("ftp://127.0.0.1/", allow_remote=False)

    bad = [
        ["--url", "http://10.0.0.1:8000", "--rate", "1", "--duration", "1"],
        ["--rate", "1"],  # neither a duration nor a count
        ["--rate", "0", "--duration", "1"],
        ["--concurrency", "1", "--requests", "1", "--max-tokens", "uniform:5,2"],
        ["--concurrency", "1", "--requests", "1", "--extra-body", "[1]"],
        ["--concurrency", "1", "--requests", "1", "--api-key", "a=1", "--tenant-weights", "1,1"],
    ]
    for args in bad:
        with pytest.raises(SystemExit) as exc:
            main(["--model", "m", *args])
        assert exc.value.code == 2
    assert "not a loopback address; pass --allow-remote" in capsys.readouterr().err

    # The documented command line, as a user runs it.
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.loadgen", *("--url", "http://203.0.113.5:8000", "--model", "m"), "--rate=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "203.0.113.5 is not a loopback address" in done.stderr


def test_without_matplotlib_the_report_is_written_and_the_plot_explained(server: FakeServer, tmp_path: Path) -> None:
    """After a plain install (no matplotlib) the run still ends well: the JSON, and how to get the plot."""
    hide = (  # `import matplotlib` fails as where it is not installed
        "import sys\nsys.modules['matplotlib'] = None\n"
        "from loadtests.loadgen import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "results" / "load.json"
    args = ("--url", server.url, "--model", "m", "--concurrency", "2", "--requests", "4", "--json", str(out))
    done = subprocess.run([sys.executable, "-c", hide, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["requests"]["completed"] == 4
    assert "plot: not drawn, matplotlib is not installed: `pip install matplotlib`" in done.stdout
    assert "Traceback" not in done.stderr and not out.with_suffix(".png").exists()


def test_make_serve_installs_what_the_readme_examples_import() -> None:
    """`make serve` installs the `client` extra; every module the README's examples import is in it or in the
    package's own dependencies."""
    import re

    dry_run = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry_run.returncode == 0 and "scripts/setup.sh client" in dry_run.stdout
    pyproject = (REPO / "pyproject.toml").read_text()
    lists = "".join(
        re.search(rf"^{n} = \[(.*?)^\]", pyproject, re.S | re.M).group(1) for n in ("dependencies", "client")
    )
    installed = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in re.findall(r'"([^"]+)"', lists)}
    readme = (REPO / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S))
    imported = set(re.findall(r"^(?:from|import) (\w+)", code, re.M))
    assert imported and imported <= installed | {"loramux"}
    assert "matplotlib" in installed  # the load generator's plot, one of the README's commands


def test_workload_distributions_are_seeded_and_in_range() -> None:
    rng = random.Random(0)
    assert {LengthDist.parse("7").sample(rng) for _ in range(5)} == {7}
    uniform = [LengthDist.parse("uniform:3,6").sample(rng) for _ in range(400)]
    assert set(uniform) == {3, 4, 5, 6}
    lognormal = sorted(LengthDist.parse("lognormal:100,0.6").sample(rng) for _ in range(2000))
    assert 85 <= lognormal[1000] <= 115  # the median
    assert max(LengthDist.parse("lognormal:100,2,150").sample(rng) for _ in range(500)) == 150
    for text in ("0", "fixed:2.5", "uniform:4", "lognormal:0,1", "lognormal:10,1,5", "normal:3,1", "uniform:a,b"):
        with pytest.raises(ValueError, match="length distribution"):
            LengthDist.parse(text)

    weights = zipf_weights(4, 1.0)
    assert sum(weights) == pytest.approx(1.0) and weights[0] / weights[1] == pytest.approx(2.0)
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)

    arrivals = poisson_arrivals(50.0, seed=1)
    times = [next(arrivals) for _ in range(2000)]
    assert times == sorted(times) and times[-1] / 2000 == pytest.approx(1 / 50, rel=0.1)

    def first(n: int, seed: int) -> list[tuple[str, str, str, int]]:
        workload = Workload(
            ["a", "b", "c"],
            [Tenant("x", "kx"), Tenant("y", "ky")],
            LengthDist.parse("uniform:2,9"),
            LengthDist.parse("lognormal:16,0.5"),
            seed=seed,
        )
        plans = workload.plans()
        return [(p.tenant.name, p.model, p.prompt, p.max_tokens) for p in (next(plans) for _ in range(n))]

    assert first(50, seed=5) == first(50, seed=5) != first(50, seed=6)
    assert all(2 <= len(prompt.split()) <= 9 for _, _, prompt, _ in first(50, seed=5))


def test_a_sampling_mix_sends_each_request_its_own_settings(server: FakeServer, tmp_path: Path) -> None:
    rc, report = run_cli(
        server, tmp_path, "--model", "m", "--concurrency", "8", "--requests", "200", "--max-tokens", "2",
        "--sampling", "mix", "--no-plot",
    )  # fmt: skip
    assert rc == 0 and report["config"]["sampling"] == "mix"
    bodies = [r["body"] for r in server.received]
    kinds = Counter(
        "greedy" if b.get("temperature") == 0 else "top_p" if "top_p" in b else "seeded" if "seed" in b else "default"
        for b in bodies
    )
    assert set(kinds) == {"default", "top_p", "greedy", "seeded"}
    assert 0.3 < kinds["default"] / 200 < 0.6 and 0.1 < kinds["greedy"] / 200 < 0.3  # near 45% and 20%
    assert all(b["top_p"] == 0.9 for b in bodies if "top_p" in b)
    assert len({b["seed"] for b in bodies if "seed" in b}) == kinds["seeded"]  # a seed of its own each


def test_several_client_processes_share_the_load_and_one_report_counts_it_all(
    server: FakeServer, tmp_path: Path
) -> None:
    server.reset(per_token_s=0.001)
    rc, report = run_cli(
        server, tmp_path, "--model", "a,b", "--concurrency", "6", "--requests", "30", "--max-tokens", "4",
        "--processes", "3", "--no-plot",
    )  # fmt: skip
    assert rc == 0 and len(server.received) == 30
    assert report["requests"]["sent"] == report["requests"]["completed"] == 30
    assert report["tokens"]["output"] == 120
    assert sorted(s["index"] for s in report["samples"]) == list(range(30))  # one numbering for all processes
    assert report["config"]["processes"] == 3


@pytest.mark.parametrize("processes", [1, 2])
def test_a_closed_loop_opens_its_connections_before_the_clock_starts(
    server: FakeServer, tmp_path: Path, processes: int
) -> None:
    rc, report = run_cli(
        server, tmp_path, "--model", "a", "--concurrency", "4", "--requests", "12", "--max-tokens", "3",
        "--processes", str(processes), "--no-plot",
    )  # fmt: skip
    assert rc == 0 and report["requests"]["completed"] == 12
    # one probe per worker, on as many connections, and every request rode one of them
    assert len(server.health_ports) == len(set(server.health_ports)) == 4
    assert {r["port"] for r in server.received} <= set(server.health_ports)


def test_an_open_loop_opens_connections_as_its_arrivals_come(server: FakeServer, tmp_path: Path) -> None:
    rc, report = run_cli(server, tmp_path, "--model", "a", "--rate", "50", "--requests", "5", "--max-tokens", "2",
                         "--no-plot")  # fmt: skip
    assert rc == 0 and report["requests"]["completed"] == 5
    assert server.health_ports == []
