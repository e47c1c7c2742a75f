"""The soak of record: `loramux serve` held at saturation through HTTP for 15 minutes (on a GPU; --tiny on the CPU).

W2's adapters and the requests users send, some of whose clients hang up mid-stream: no request may fail, memory must
stay flat, and at the end every request, KV block and adapter slot must be free again.

    python loadtests/soak.py                 # on a GPU: the Llama-3-8B shape, 1,000 adapters, 900 s
    python loadtests/soak.py --tiny          # on the CPU: a tiny model, 12 adapters, 60 s (CI runs a short one)

1. Writes a checkpoint of random weights (bench_serve.py's: the default model's tokenizer, its vocabulary grown to
   the shape's; a tokenizer without a chat template is refused before anything starts, since chats are sent),
   starts `loramux serve --base CKPT` as a process of its own and pushes W2's adapters to it (ranks 8 to 64 on
   q_proj and v_proj; on the CPU rank 8 only, through 2 slots, so that adapters rotate through slot memory).
2. Warms up with twice the concurrency's worth of requests, which are not counted; a failed one stops the soak there.
3. Loads the server for `--duration` seconds: `--concurrency` workers (1.25 x the server's max-num-seqs, so that
   requests also queue) spread over client processes, each sending one request after another: a model with Zipf
   popularity over the base and the adapters, a sampling setting from W2's mix, prompt and output lengths from
   ranges (EOS ignored, so that answers are as long as asked), and a kind: streaming completion (45%), streaming chat
   (20%), a completion or a chat without streaming (10% each), or a stream whose client closes the connection after
   1 to 8 chunks of text (15%, counted as dropped, not failed).
4. Meanwhile samples, every few seconds, the memory of the server's processes (the `loramux serve` process and its
   children: API processes, the engine process, adapter readers; proportional set sizes, so that the pages they share
   count once) and, from /metrics, the device memory torch holds (on CUDA), the requests running and waiting and the
   KV blocks used.
5. After the deadline waits for the requests in flight, then up to 60 s for /metrics to show no request running,
   waiting or resolving, no KV block and no slot used; checks that the server still answers /health; stops it with
   SIGTERM and keeps its exit status.
6. Prints a table and the checks (`no_failures`, `completed_enough`, `drops_seen`, `host_memory_flat`,
   `device_memory_flat`, `all_freed`, `server_healthy`) and writes one JSON with every count, the time series of the
   samples and the checks (by default a new dated file under loadtests/results/; none with --tiny). The exit status
   is 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_serve import (
    SHAPES,
    ProcessTimes,
    default_tokenizer_dir,
    push_many,
    start_server,
    stop_server,
    w2_adapters,
    write_checkpoint,
)
from loadtests.record import dated_json_path, help_text, run_header, workdir
from loadtests.workload import SAMPLING, WORDS, zipf_weights

MiB = 1 << 20
# The kinds of request and their shares of the load. `drop` is a stream whose client closes the connection early.
KINDS = {"stream_completion": 0.45, "stream_chat": 0.20, "completion": 0.10, "chat": 0.10, "drop": 0.15}
PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
# /metrics gauges that must all be 0 once the load is over, and those the sampler records during it.
FREED = ("requests_running", "requests_waiting", "requests_resolving", "kv_blocks_used", "slots_used")
SAMPLED = ("device_memory_allocated_bytes", "device_memory_reserved_bytes", "requests_running", "requests_waiting",
           "kv_blocks_used")  # fmt: skip


def plan(args: argparse.Namespace) -> dict:
    """The sizes of the run: on the GPU, and on the CPU with --tiny."""
    if args.tiny:
        return {"shape": "tiny", "adapters": 12, "ranks": (8,), "max_num_seqs": 16, "duration": 60.0,
                "prompt_words": (4, 32), "max_tokens": (8, 32), "sample_every": 2.0, "push_processes": 2,
                "server": ["--slots", "2", "--max-lora-rank", "8", "--max-num-seqs", "16",
                           "--max-num-batched-tokens", "1024"]}  # fmt: skip
    return {"shape": args.shape, "adapters": 1000, "ranks": (8, 16, 32, 64), "max_num_seqs": 256, "duration": 900.0,
            "prompt_words": (16, 256), "max_tokens": (16, 256), "sample_every": 5.0, "push_processes": 8,
            "server": ["--slots", "64", "--max-lora-rank", "64"]}  # fmt: skip


# -- one request -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str  # a key of KINDS
    path: str
    body: dict
    drop_after: int = 0  # a `drop` closes the connection after this many chunks of text (0: reads to the end)


def make_request(rng: random.Random, settings: dict) -> Request:
    """A request of the load: kind, model (Zipf), sampling (W2's mix), prompt words and max_tokens from `settings`."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    endpoint = next((e for e in PATHS if kind.endswith(e)), None) or rng.choice(list(PATHS))
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*settings["prompt_words"])))
    mix = SAMPLING["mix"]
    sampling = dict(rng.choices([f for _, f in mix], weights=[w for w, _ in mix])[0])
    if "seed" in sampling:
        sampling["seed"] = rng.randrange(2**31)
    body = {"model": rng.choices(settings["models"], weights=settings["weights"])[0],
            "max_tokens": rng.randint(*settings["max_tokens"]), "ignore_eos": True, **sampling}  # fmt: skip
    body |= {"messages": [{"role": "user", "content": prompt}]} if endpoint == "chat" else {"prompt": prompt}
    if kind.startswith("stream") or kind == "drop":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return Request(kind, PATHS[endpoint], body, rng.randint(1, 8) if kind == "drop" else 0)


class Failure(Exception):
    """A request that did not get a whole, well-formed answer."""


async def send(client: httpx.AsyncClient, request: Request, timeout: float) -> tuple[str, int, str | None]:
    """Send `request` -> (outcome, completion tokens, what went wrong): `ok`, `dropped` (its client closed the
    stream on purpose) or `failed` (a status other than 200, an error in the stream, a stream ended before
    `data: [DONE]` or without usage, a body without choices or usage, a timeout, a connection error)."""
    answer = _stream(client, request) if request.body.get("stream") else _plain(client, request)
    try:
        return await asyncio.wait_for(answer, timeout)
    except Failure as exc:
        return "failed", 0, str(exc)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return "failed", 0, f"timeout: no complete answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return "failed", 0, f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not the JSON of an answer
        return "failed", 0, f"bad_response: {type(exc).__name__}: {exc}"


async def _plain(client: httpx.AsyncClient, request: Request) -> tuple[str, int, str | None]:
    response = await client.post(request.path, json=request.body)
    if response.status_code != 200:
        raise Failure(f"http_{response.status_code}: {response.text[:200]}")
    answer = response.json()
    if not answer.get("choices") or not answer.get("usage"):
        raise Failure(f"bad_response: no choices or no usage in {response.text[:200]!r}")
    return "ok", int(answer["usage"]["completion_tokens"]), None


async def _stream(client: httpx.AsyncClient, request: Request) -> tuple[str, int, str | None]:
    async with client.stream("POST", request.path, json=request.body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            raise Failure(f"http_{response.status_code}: {text[:200]}")
        chunks, tokens = 0, None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                if tokens is None:
                    raise Failure("no_usage: the stream ended without a usage chunk")
                return "ok", tokens, None
            chunk = json.loads(data)
            if "error" in chunk:
                raise Failure(f"stream_error: {json.dumps(chunk['error'])[:200]}")
            for choice in chunk.get("choices") or []:
                chunks += bool((choice.get("delta") or {}).get("content") or choice.get("text"))
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if request.drop_after and chunks >= request.drop_after:
                return "dropped", chunks, None  # leaving `async with` mid-stream closes the connection
        raise Failure("disconnect: the stream ended before data: [DONE]")


# -- the clients -------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes by kind, the tokens of the answers completed, and the first few errors."""

    counts: dict = field(default_factory=lambda: {kind: {"ok": 0, "dropped": 0, "failed": 0} for kind in KINDS})
    tokens: int = 0
    short: int = 0  # answers completed with fewer tokens than asked (EOS is ignored: none expected)
    errors: list = field(default_factory=list)

    def add(self, request: Request, outcome: str, tokens: int, error: str | None) -> None:
        self.counts[request.kind][outcome] += 1
        if outcome == "ok":
            self.tokens += tokens
            self.short += tokens < request.body["max_tokens"]
        if error and len(self.errors) < 10:
            self.errors.append(f"{request.kind} {request.body['model']}: {error}"[:400])


def merge(tallies: list[dict]) -> dict:
    """The tallies of the client processes as one."""
    total = Tally()
    for tally in tallies:
        for kind, outcomes in tally["counts"].items():
            for outcome, n in outcomes.items():
                total.counts[kind][outcome] += n
        total.tokens, total.short = total.tokens + tally["tokens"], total.short + tally["short"]
        total.errors += tally["errors"][: 10 - len(total.errors)]
    return vars(total)


async def drive(url: str, settings: dict, workers: int, seed: int, deadline: float, budget: int | None) -> dict:
    """`workers` clients sending requests one after another until `deadline` (a `time.time()`), or until `budget`
    requests were started -> the tally, as a dict."""
    tally, left = Tally(), [budget]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=workers)

    async def worker(client: httpx.AsyncClient, rng: random.Random) -> None:
        while time.time() < deadline and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            request = make_request(rng, settings)
            tally.add(request, *await send(client, request, settings["timeout"]))

    async with httpx.AsyncClient(base_url=url, timeout=settings["timeout"], limits=limits) as client:
        await asyncio.gather(*(worker(client, random.Random(seed * 100_003 + i)) for i in range(workers)))
    return vars(tally)


def client_process(url: str, settings: dict, workers: int, seed: int, deadline: float, budget: int | None) -> dict:
    return asyncio.run(drive(url, settings, workers, seed, deadline, budget))


def run_clients(url: str, settings: dict, concurrency: int, processes: int, seed: int, *, deadline: float = 1e18,
                budget: int | None = None) -> dict:  # fmt: skip
    """`concurrency` workers spread over `processes` processes (spawned; an asyncio loop each) -> the merged tally."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    jobs = [(url, settings, n, seed + i, deadline, None if budget is None else -(-budget * n // concurrency))
            for i, n in enumerate(shares)]  # fmt: skip
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return merge(pool.starmap(client_process, jobs))


# -- what the server holds ---------------------------------------------------------------------------------------


def gauge(text: str, name: str) -> float | None:
    """The value of the unlabelled Prometheus sample `name` in `text`; None when it is absent."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return None


def read_gauges(url: str, names: tuple[str, ...]) -> dict[str, float | None]:
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        text = ""
    return {name: gauge(text, f"loramux_{name}") for name in names}


class Sampler(threading.Thread):
    """Every `every` seconds from `t0` (a `time.time()`): the memory of the server's processes (all, the
    engine's side: the engine process and its adapter readers) and the SAMPLED gauges of /metrics."""

    def __init__(self, url: str, times: ProcessTimes, every: float, t0: float) -> None:
        super().__init__(daemon=True)
        self.url, self.times, self.every, self.t0 = url, times, every, t0
        self.samples: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            sample = {"t": round(time.time() - self.t0, 2), **self.memory(), **read_gauges(self.url, SAMPLED)}
            self.samples.append(sample)
            if self.done.wait(self.every):
                return

    def memory(self) -> dict[str, int]:
        """The proportional set size (PSS) of each process, summed: a page shared by several of them (the adapter
        cache the engine shares with its reader processes) counts once in the sum, as its shares. Where PSS cannot
        be read, the resident set size."""
        root, engine = self.times.root, self.times.engine
        engine_side = {engine.pid, *(c.pid for c in _children(engine))}
        sizes = {}
        for process in [root, *_children(root)]:
            with contextlib.suppress(Exception):  # gone meanwhile
                sizes[process.pid] = _resident(process)
        return {"memory_bytes": sum(sizes.values()),
                "memory_engine_bytes": sum(v for pid, v in sizes.items() if pid in engine_side)}  # fmt: skip


def _resident(process) -> int:
    try:
        return process.memory_full_info().pss
    except (AttributeError, OSError):
        return process.memory_info().rss


def _children(process) -> list:
    try:
        return process.children(recursive=True)
    except Exception:  # gone meanwhile
        return []


def memory_growth(samples: list[tuple[float, float | None]], duration: float, floor: float, fraction: float) -> dict:
    """How much the median of the load's last quarter is above the median from 20% to 45% of it (`samples` are
    (seconds since the load began, bytes); None values are left out). It passes below max(floor, fraction x the
    early median); `passed` is None where either window has no sample."""
    early = [v for t, v in samples if v is not None and 0.2 * duration <= t < 0.45 * duration]
    late = [v for t, v in samples if v is not None and 0.75 * duration <= t <= duration]
    if not early or not late:
        return {"passed": None, "early_samples": len(early), "late_samples": len(late)}
    early_median, late_median = statistics.median(early), statistics.median(late)
    bound = max(floor, fraction * early_median)
    growth = late_median - early_median
    return {"passed": growth < bound, "early_median": early_median, "late_median": late_median, "growth": growth,
            "bound": bound, "early_samples": len(early), "late_samples": len(late)}  # fmt: skip


def wait_freed(url: str, limit: float = 60.0) -> dict:
    """Polls /metrics up to `limit` seconds until every FREED gauge is 0 -> the last values and the wait."""
    started = time.perf_counter()
    while True:
        gauges = read_gauges(url, FREED)
        freed = all(value == 0 for value in gauges.values())
        waited = time.perf_counter() - started
        if freed or waited > limit:
            return {"freed": freed, "seconds": round(waited, 1), "gauges": gauges}
        time.sleep(1.0)


# -- the run -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def online() -> Iterator[None]:
    """HF_HUB_OFFLINE left out of the environment (of the push processes spawned meanwhile): the pushes go to the
    server started here, and nowhere else."""
    offline = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        yield
    finally:
        if offline is not None:
            os.environ["HF_HUB_OFFLINE"] = offline


def has_chat_template(directory: Path) -> bool:
    """Whether the tokenizer in `directory` renders chats (as the server will load it)."""
    from transformers import AutoTokenizer

    return bool(AutoTokenizer.from_pretrained(str(directory)).chat_template)


def prepare(args: argparse.Namespace, root: Path, results: dict) -> tuple[Path, list[tuple], dict]:
    """The checkpoint (kept in a --workdir for the next run), W2's adapters on disk, the server's environment."""
    env = {**os.environ, "LORAMUX_HOME": str(root / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    if args.device == "cpu":  # a tiny model needs no intra-op threads: the cores go to the API and the clients
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    shape, checkpoint = SHAPES[args.shape], root / "checkpoint"
    began = time.perf_counter()
    written = (checkpoint / "config.json").exists()
    if not has_chat_template(checkpoint if written else args.tokenizer):  # a fifth of the requests are chats
        raise ValueError(f"{checkpoint if written else args.tokenizer} has no chat template (chat_template.jinja or "
                         "tokenizer_config.json's chat_template), and the soak sends chat requests")  # fmt: skip
    if not written:
        write_checkpoint(checkpoint, shape, args.tokenizer, args.device)
    adapters = w2_adapters(root, shape, args.adapters, args.plan["ranks"])
    results["checkpoint_seconds"] = round(time.perf_counter() - began, 1)
    (root / "home").mkdir(parents=True, exist_ok=True)
    return checkpoint, adapters, env


def run(args: argparse.Namespace, root: Path, results: dict) -> None:
    """Server up, adapters pushed, warm-up, the load, the end state; the server stopped whatever happened."""
    checkpoint, adapters, env = prepare(args, root, results)
    process, url, log, ready_s = start_server(checkpoint, root / "home", args.plan["server"], env)
    results["server"] = {"args": args.plan["server"], "ready_seconds": round(ready_s, 1)}
    print(f"loramux serve ready in {ready_s:.0f}s", flush=True)
    try:
        started = time.perf_counter()
        with online():
            push_many(adapters, url, processes=args.plan["push_processes"])
        results["push_seconds"] = round(time.perf_counter() - started, 1)
        print(f"pushed {len(adapters)} adapters in {results['push_seconds']:.0f}s", flush=True)
        cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        base = next(card["id"] for card in cards if card.get("parent") is None)
        models = [base, *(name for _, name in adapters)]  # the base the most popular, then the adapters in turn
        settings = {"models": models, "weights": zipf_weights(len(models), 1.0), "timeout": args.timeout,
                    "prompt_words": args.plan["prompt_words"], "max_tokens": args.plan["max_tokens"]}  # fmt: skip
        load(args, url, process, settings, results)
    finally:
        results["server"]["exit_status"] = stop_server(process)
        results["server"]["log_tail"] = log.read_text(errors="replace")[-3000:]


def load(args: argparse.Namespace, url: str, process, settings: dict, results: dict) -> None:
    """The warm-up, the load with the sampler beside it, then the end state."""
    warm = run_clients(url, settings, args.concurrency, args.client_processes, args.seed + 1000,
                       budget=2 * args.concurrency)  # fmt: skip
    results["warmup"] = {"counts": warm["counts"], "errors": warm["errors"]}
    print(f"warm-up: {sum(c['ok'] for c in warm['counts'].values())} requests answered", flush=True)
    failed = {kind: c["failed"] for kind, c in warm["counts"].items() if c["failed"]}
    if failed:  # a set-up that fails requests would fail them for the whole load: stop before it
        raise RuntimeError(f"the warm-up had failed requests {failed}, e.g. {warm['errors'][:1]}; the load was not run")
    times = ProcessTimes(process.pid, url)
    cpu_before, t0 = times.take(), time.time()
    sampler = Sampler(url, times, args.sample_every, t0)
    sampler.start()
    try:
        tally = run_clients(url, settings, args.concurrency, args.client_processes, args.seed,
                            deadline=t0 + args.duration)  # fmt: skip
    finally:
        sampler.done.set()
        sampler.join()
        results["samples"] = sampler.samples
    load_s = time.time() - t0
    cpu = [after - before for before, after in zip(cpu_before, times.take(), strict=True)]
    results["load"] = {**tally, "seconds": round(load_s, 1), "tokens_per_s": tally["tokens"] / load_s,
                       "cpu_seconds": {"engine": cpu[0], "api": cpu[1]}}  # fmt: skip
    results["end"] = wait_freed(url)
    results["end"]["counters"] = read_gauges(url, ("adapter_slot_loads", "preemptions"))  # the rotation, for the record
    try:
        health = httpx.get(f"{url}/health", timeout=30).status_code
    except httpx.HTTPError:
        health = None
    results["server"] |= {"alive": process.poll() is None, "health_status": health}


# -- the verdict -------------------------------------------------------------------------------------------------


def memory(results: dict, duration: float) -> dict:
    """The growth of host memory (PSS of the server's processes) and of device memory (torch's allocated bytes)."""
    samples = results.get("samples", [])
    host = [(s["t"], s["memory_bytes"]) for s in samples]
    device = [(s["t"], s.get("device_memory_allocated_bytes")) for s in samples]
    return {"host": memory_growth(host, duration, 256 * MiB, 0.10),
            "device": memory_growth(device, duration, 256 * MiB, 0.02)}  # fmt: skip


def checks(results: dict, duration: float, on_cuda: bool) -> dict[str, dict]:
    """Each check of the soak with its figures; `passed` is True, False, or None where it does not apply."""
    counts = results.get("load", {}).get("counts", {})
    total = {o: sum(c[o] for c in counts.values()) for o in ("ok", "dropped", "failed")}
    completed = {kind: c["ok"] for kind, c in counts.items() if kind != "drop"}
    grown = memory(results, duration)
    end, server = results.get("end", {}), results.get("server", {})
    healthy = server.get("alive") is True and server.get("health_status") == 200 and server.get("exit_status") == 0
    device = {**grown["device"], "passed": grown["device"]["passed"] is True} if on_cuda else {"passed": None}
    return {
        "no_failures": {"passed": bool(counts) and total["failed"] == 0, "failed": total["failed"],
                        "errors": results.get("load", {}).get("errors", [])},
        "completed_enough": {"passed": bool(completed) and all(completed.values()), "ok": total["ok"],
                             "by_kind": completed},
        "drops_seen": {"passed": total["dropped"] > 0, "dropped": total["dropped"]},
        "host_memory_flat": {**grown["host"], "passed": grown["host"]["passed"] is True},
        "device_memory_flat": device,
        "all_freed": {"passed": end.get("freed") is True, **end.get("gauges", {})},
        "server_healthy": {"passed": healthy, **{k: server.get(k) for k in ("alive", "health_status", "exit_status")}},
    }  # fmt: skip


def table(results: dict) -> str:
    lines = [f"{'requests':20} {'ok':>8} {'dropped':>8} {'failed':>8}", "-" * 47]
    counts = results.get("load", {}).get("counts", {})
    for kind, c in counts.items():
        lines.append(f"{kind:20} {c['ok']:8} {c['dropped']:8} {c['failed']:8}")
    if counts:
        load = results["load"]
        totals = (sum(c[outcome] for c in counts.values()) for outcome in ("ok", "dropped", "failed"))
        lines.append(f"{'all':20} " + " ".join(f"{n:8}" for n in totals))
        lines.append(f"{load['tokens']} tokens completed in {load['seconds']:.0f} s: {load['tokens_per_s']:.1f}/s")
    for name, check in results.get("checks", {}).items():
        verdict = {True: "PASS", False: "FAIL", None: "skip"}[check["passed"]]
        figures = {k: v for k, v in check.items() if k not in ("passed", "errors")}
        text = ", ".join(f"{k} {v / MiB:.0f} MiB" if k in _BYTES else f"{k} {v}" for k, v in figures.items())
        lines.append(f"{name:20} {verdict}  {text}"[:200])
    for error in results.get("load", {}).get("errors", [])[:5]:
        lines.append(f"  e.g. {error}"[:200])
    return "\n".join(lines)


_BYTES = {"early_median", "late_median", "growth", "bound"}


# -- the command -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=help_text(__doc__))
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, 12 adapters of rank 8 in 2 slots")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="the checkpoint's shape")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="a directory with tokenizer.json and a chat template (default: the default model's)",
    )
    p.add_argument("--duration", type=float, help="seconds of load (default 900; --tiny 60)")
    p.add_argument("--concurrency", type=int, help="workers (default 1.25 x max-num-seqs: 320; --tiny 20)")
    p.add_argument("--client-processes", type=int, help="client processes (default: by CPUs; --tiny 1)")
    p.add_argument("--adapters", type=int, help="W2's adapters pushed (default 1000; --tiny 12)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (default 300)")
    p.add_argument("--sample-every", type=float, help="seconds between memory samples (default 5; --tiny 2)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the requests")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one; cpu with --tiny)")
    p.add_argument("--workdir", type=Path, help="keep the checkpoint, adapters and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="default: a new dated file under loadtests/results/ (none with --tiny)")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.plan = plan(args)
    args.shape = args.plan["shape"]
    args.duration = args.duration or args.plan["duration"]
    args.concurrency = args.concurrency or round(1.25 * args.plan["max_num_seqs"])
    args.adapters = args.adapters if args.adapters is not None else args.plan["adapters"]
    args.sample_every = args.sample_every or args.plan["sample_every"]
    if args.client_processes is None:
        args.client_processes = 1 if args.tiny else max(1, min(8, (os.cpu_count() or 2) // 4))
    args.tokenizer = args.tokenizer or default_tokenizer_dir()
    if args.json is None and not args.tiny:
        args.json = dated_json_path("soak")
    return args


_PLANNED = ("ranks", "max_num_seqs", "prompt_words", "max_tokens", "server")  # the plan's figures the JSON keeps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_header("loadtests/soak.py", argv if argv is not None else sys.argv[1:], args.device, args.shape)
    results["settings"] = {"duration_s": args.duration, "concurrency": args.concurrency, "adapters": args.adapters,
                           "client_processes": args.client_processes, "timeout_s": args.timeout, "seed": args.seed,
                           "sample_every_s": args.sample_every,
                           **{k: v for k, v in args.plan.items() if k in _PLANNED}}  # fmt: skip
    try:
        with workdir(args.workdir, "loramux-soak-") as root:
            run(args, root, results)
    except Exception as exc:  # the checks still say what was seen, and fail
        results["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        print(f"the soak stopped early: {results['error']}", flush=True)
    finally:
        results["checks"] = checks(results, args.duration, args.device == "cuda")
        results["passed"] = "error" not in results and all(c["passed"] is not False for c in results["checks"].values())
        print(table(results))
        print("PASS" if results["passed"] else "FAIL")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"wrote {args.json}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
