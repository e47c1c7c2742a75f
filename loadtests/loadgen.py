"""Load generator for OpenAI-compatible servers: streaming chat or text completions from several tenants to adapters
of Zipf popularity, with open-loop Poisson arrivals or a fixed concurrency, for a duration and/or a request count.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --model acme/support --model acme/legal \\
        --api-key acme=KEY1 --api-key globex=KEY2 --rate 4 --duration 60 --json out/load.json

It writes a JSON report (throughput, TTFT/TPOT/end-to-end percentiles, errors by kind, per-tenant and per-model
shares, a timeline and every request; by default a new dated file in loadtests/results/) and a PNG of latency and
throughput over time beside it. In a fixed-concurrency run each worker has its own client and connection, opened
before the clock starts, and every request reads its stream to the end so that the next one reuses the connection,
as long-lived clients of OpenAI's SDK do. It refuses to target anything
but a loopback address unless given --allow-remote. From Python: `asyncio.run(run_load(LoadConfig(...)))`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import multiprocessing
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.client import ENDPOINTS, RequestRecord, send_request, start_record
from loadtests.record import dated_json_path
from loadtests.report import build_report, plot, summary_text, write_json
from loadtests.workload import SAMPLING, LengthDist, RequestPlan, Tenant, Workload, poisson_arrivals


@dataclass
class LoadConfig:
    """One load run. Exactly one of `rate` (open-loop Poisson arrivals, requests/s) and `concurrency` (that many
    requests always in flight); at least one of `duration_s` and `requests`: no request starts after either is
    reached. Requests still in flight then get `drain_s` (default: `timeout_s`) to finish before they are cancelled,
    so a run lasts at most duration + drain."""

    url: str
    workload: Workload
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float | None = None
    requests: int | None = None
    endpoint: str = "chat"
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60.0
    drain_s: float | None = None
    max_in_flight: int = 1024
    allow_remote: bool = False
    # Client processes sharing the load (each a share of the concurrency, rate and requests), so that the client's
    # own parsing never bounds what is measured at thousands of tokens/s.
    processes: int = 1

    def __post_init__(self) -> None:
        self.url = check_target(self.url, self.allow_remote)
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of a rate (Poisson arrivals) and a concurrency")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give a duration, a request count or both: the run must end by itself")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"request count must be >= 1, got {self.requests}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 s, got {self.timeout_s}")
        if self.drain_s is None:
            self.drain_s = self.timeout_s
        if self.drain_s < 0:
            raise ValueError(f"drain must be >= 0 s, got {self.drain_s}")
        if self.max_in_flight < 1:
            raise ValueError(f"max in flight must be >= 1, got {self.max_in_flight}")

    def describe(self) -> dict[str, Any]:
        """The configuration as the report shows it (tenant names, never their keys)."""
        w = self.workload
        arrival: dict[str, Any] = (
            {"mode": "poisson", "rate": self.rate}
            if self.rate is not None
            else {"mode": "concurrency", "concurrency": self.concurrency}
        )
        return {
            "url": self.url,
            "endpoint": ENDPOINTS[self.endpoint],
            "arrival": arrival,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "models": w.models,
            "zipf_exponent": w.zipf_exponent,
            "tenants": [t.name for t in w.tenants],
            "tenant_weights": w.tenant_weights,
            "prompt_words": str(w.prompt_words),
            "max_tokens": str(w.max_tokens),
            "extra_body": self.extra_body,
            "timeout_s": self.timeout_s,
            "drain_s": self.drain_s,
            "max_in_flight": self.max_in_flight,
            "seed": w.seed,
            "sampling": w.sampling,
            "processes": self.processes,
        }


def check_target(url: str, allow_remote: bool) -> str:
    """The base URL to send to (a trailing `/v1` dropped: the endpoint paths carry it). Refuses hosts other than
    `localhost` and loopback IPs unless `allow_remote`: a load test aimed at the wrong host is an attack."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r}: expected an http:// or https:// URL with a host")
    if not allow_remote and not _is_loopback(parsed.host):
        raise ValueError(f"{url}: {parsed.host} is not a loopback address; pass --allow-remote to load another host")
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it could resolve anywhere


async def run_load(config: LoadConfig, stop: asyncio.Event | None = None) -> dict[str, Any]:
    """Run the load and return the report (see `loadtests.report.build_report`). Setting `stop` ends the sending
    early (the CLI sets it on Ctrl-C); in-flight requests then drain as at the end of the duration."""
    stop = stop or asyncio.Event()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if config.processes > 1:
        records, dropped, wall_s = await asyncio.to_thread(_run_shares, config)
    else:
        async with _clients(config) as clients:
            records, dropped, wall_s = await _run_share(config, clients, time.perf_counter(), stop)
    report = build_report(
        records,
        config=config.describe(),
        tenants=[t.name for t in config.workload.tenants],
        models=config.workload.models,
        wall_s=wall_s,
        dropped=dropped,
        started_at=started_at,
    )
    report["interrupted"] = stop.is_set()  # sending stopped before the duration or count was reached
    return report


@contextlib.asynccontextmanager
async def _clients(config: LoadConfig) -> AsyncIterator[list[httpx.AsyncClient]]:
    """The HTTP clients of a run, ready before its clock starts: an open loop's one client, whose pool opens
    connections as arrivals come (they are spread in time) and reuses them once free; a closed loop's one client per
    worker, each holding one connection opened here (a `GET /health`), as that many long-lived clients would already
    hold them, so that what is measured is the requests, not the load generator's own burst of TCP set-ups. One
    client per worker, not one pool: httpx's pool hands a burst of requests to the first idle connection all at once,
    and each request that finds it taken waits for the pool's next pass (a burst of 128 on 128 idle connections then
    trickled out over seconds). A probe that fails is left for the run to report."""
    tls = ssl.create_default_context()  # one for all the clients: httpx would build one each (~20 ms)
    async with contextlib.AsyncExitStack() as stack:

        def client(connections: int) -> httpx.AsyncClient:
            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            # trust_env=False: no proxy from the environment may sit between the generator and the target.
            made = httpx.AsyncClient(
                base_url=config.url, timeout=httpx.Timeout(config.timeout_s), limits=limits, trust_env=False, verify=tls
            )
            stack.push_async_callback(made.aclose)
            return made

        if config.concurrency is None:
            yield [client(config.max_in_flight)]
            return
        clients = [client(1) for _ in range(config.concurrency)]
        await asyncio.gather(*(c.get("/health", timeout=config.timeout_s) for c in clients), return_exceptions=True)
        yield clients


async def _run_share(
    config: LoadConfig, clients: list[httpx.AsyncClient], t0: float, stop: asyncio.Event
) -> tuple[list[RequestRecord], int, float]:
    """Run `config` in this process with `clients` (see `_clients`) from `t0` (a `perf_counter` value) -> (records,
    dropped, wall seconds)."""
    records: list[RecordedTask] = []
    runner = _Runner(config, clients, t0, stop, records)
    dropped = await runner.run()
    wall_s = time.perf_counter() - t0
    return [r.record for r in records], dropped, wall_s


def split(config: LoadConfig) -> list[LoadConfig]:
    """`config` cut into one config per client process: the concurrency, the request count and the rate divided
    (N Poisson streams of rate r/N make one of rate r), each share with its own seed."""
    n = config.processes
    for total in (config.concurrency, config.requests):
        if total is not None:
            n = min(n, total)

    def part(total: int | None, i: int) -> int | None:
        return None if total is None else total // n + (i < total % n)

    return [
        dataclasses.replace(
            config,
            processes=1,
            concurrency=part(config.concurrency, i),
            requests=part(config.requests, i),
            rate=None if config.rate is None else config.rate / n,
            max_in_flight=max(1, config.max_in_flight // n),
            workload=dataclasses.replace(config.workload, seed=config.workload.seed * 1000 + i),
        )
        for i in range(n)
    ]


def _run_shares(config: LoadConfig) -> tuple[list[RequestRecord], int, float]:
    """Run the shares in client processes that start together -> their records (renumbered), drops, wall time."""
    parts = split(config)
    ctx = multiprocessing.get_context("spawn")
    ready, go, start = ctx.Barrier(len(parts) + 1), ctx.Barrier(len(parts) + 1), ctx.Value("d", 0.0)
    results = ctx.Queue()
    workers = [ctx.Process(target=_share_process, args=(part, ready, go, start, results)) for part in parts]
    for worker in workers:
        worker.start()
    ready.wait()
    start.value = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process of the machine
    go.wait()
    got = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    records = sorted((r for part_records, _, _ in got for r in part_records), key=lambda r: r.start)
    for index, record in enumerate(records):
        record.index = index
    return records, sum(d for _, d, _ in got), max(w for _, _, w in got)


def _share_process(config: LoadConfig, ready, go, start, results) -> None:
    results.put(asyncio.run(_share(config, ready, go, start)))


async def _share(config: LoadConfig, ready, go, start) -> tuple[list[RequestRecord], int, float]:
    """One client process: its client and connections ready before the barrier, then the run from the common start.
    (The barriers block this process's loop while it has nothing else to do.)"""
    async with _clients(config) as clients:
        ready.wait()
        go.wait()
        return await _run_share(config, clients, start.value, asyncio.Event())


@dataclass
class RecordedTask:
    record: RequestRecord
    task: asyncio.Task[None]


class _Runner:
    """Starts requests on schedule and stops by itself: no new request after the duration or the count, then at
    most `drain_s` for those in flight."""

    def __init__(
        self,
        config: LoadConfig,
        clients: list[httpx.AsyncClient],
        t0: float,
        stop: asyncio.Event,
        started: list[RecordedTask],
    ) -> None:
        # clients: an open loop's one, a closed loop's one per worker
        self.config, self.clients, self.t0, self.stop, self.started = config, clients, t0, stop, started
        self.plans: Iterator[RequestPlan] = config.workload.plans()
        self.in_flight: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def may_start(self, at: float) -> bool:
        c = self.config
        return (
            not self.stop.is_set()
            and (c.requests is None or len(self.started) < c.requests)
            and (c.duration_s is None or at < c.duration_s)
        )

    def launch(self, client: httpx.AsyncClient) -> asyncio.Task[None]:
        plan = next(self.plans)
        record = start_record(plan, self.t0)
        c = self.config
        request = send_request(
            client, plan, record, endpoint=c.endpoint, extra_body=c.extra_body, timeout_s=c.timeout_s, t0=self.t0
        )
        task = asyncio.create_task(request)
        self.started.append(RecordedTask(record, task))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        return task

    async def run(self) -> int:
        dropped = await (self.open_loop() if self.config.rate is not None else self.closed_loop())
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=self.config.drain_s)
        await self.cancel_the_rest()
        return dropped

    async def open_loop(self) -> int:
        """Poisson arrivals, independent of how fast the server answers. An arrival that finds `max_in_flight`
        requests outstanding is dropped and counted, never delayed: delaying it would close the loop."""
        dropped = 0
        for at in poisson_arrivals(self.config.rate or 0.0, self.config.workload.seed):
            if not self.may_start(at):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, at - self.now()))
            if self.stop.is_set():
                break
            if len(self.in_flight) >= self.config.max_in_flight:
                dropped += 1
                continue
            self.launch(self.clients[0])
        return dropped

    async def closed_loop(self) -> int:
        """`concurrency` workers, each sending its next request as soon as its last one ends."""

        async def worker(client: httpx.AsyncClient) -> None:
            while self.may_start(self.now()):
                await self.launch(client)

        workers = [asyncio.create_task(worker(client)) for client in self.clients]
        duration = self.config.duration_s
        # Workers stop starting requests at the duration; in-flight requests then have drain_s.
        timeout = None if duration is None else max(0.0, duration - self.now()) + (self.config.drain_s or 0.0)
        await asyncio.wait(workers, timeout=timeout)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return 0

    async def cancel_the_rest(self) -> None:
        pending = [t for t in self.started if not t.task.done()]
        for t in pending:
            t.task.cancel()
        await asyncio.gather(*(t.task for t in pending), return_exceptions=True)
        now = self.now()
        for t in self.started:  # also those a cancelled closed-loop worker took down with it
            if t.record.end is None:
                t.record.error, t.record.end = "cancelled", now
                t.record.message = f"still in flight {self.config.drain_s:g} s after sending stopped"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.loadgen",
        description="Streaming OpenAI-protocol load: tenants, Zipf adapter popularity, Poisson arrivals or a fixed "
        "concurrency. Writes a JSON report and a PNG of latency and throughput over time.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--allow-remote", action="store_true", help="allow a URL whose host is not a loopback address")
    p.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat", help="chat or text completions")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME[,NAME...]",
        help="model field values (adapters), most popular first; repeat or comma-separate",
    )
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of model popularity, 0 = uniform (1.0)")
    p.add_argument(
        "--api-key", action="append", default=[], metavar="[NAME=]KEY", help="a tenant's API key; repeat for several"
    )
    p.add_argument("--tenant-weights", metavar="W1,W2,...", help="relative request share per tenant (default equal)")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    load.add_argument("--concurrency", type=int, help="closed loop: keep this many requests in flight")
    p.add_argument("--duration", type=float, help="seconds during which new requests start")
    p.add_argument("--requests", type=int, help="number of requests to send")
    p.add_argument(
        "--prompt-words",
        default="uniform:16,64",
        metavar="DIST",
        help="prompt length in words: N, uniform:LO,HI or lognormal:MEDIAN,SIGMA[,MAX] (%(default)s)",
    )
    p.add_argument("--max-tokens", default="32", metavar="DIST", help="max_tokens per request, same forms (32)")
    p.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true so outputs run to max_tokens')
    p.add_argument("--extra-body", default="{}", metavar="JSON", help="more fields for every request body")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (60)")
    p.add_argument("--drain", type=float, help="seconds in-flight requests get after sending stops (the timeout)")
    p.add_argument("--max-in-flight", type=int, default=1024, help="open loop: drop arrivals beyond this (1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix and the arrivals (0)")
    p.add_argument(
        "--sampling",
        choices=sorted(SAMPLING),
        default="default",
        help="sampling fields per request: default (none: the server's defaults), greedy (temperature 0), or mix "
        "(45%% default, 25%% top_p 0.9, 20%% greedy, 10%% seeded; like real traffic)",
    )
    p.add_argument(
        "--processes", type=int, default=1, help="client processes sharing the load (for thousands of tokens/s)"
    )
    p.add_argument(
        "--json", type=Path, help="report path (default: a new dated file in loadtests/results/, one per run)"
    )
    p.add_argument("--png", type=Path, help="plot path (default: the report path with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--fail-on-errors", action="store_true", help="exit 1 if any request failed or was dropped")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    models = [m.strip() for group in args.model for m in group.split(",") if m.strip()]
    tenants = [Tenant.parse(k, i) for i, k in enumerate(args.api_key)] or [Tenant("anonymous", None)]
    weights = None
    if args.tenant_weights:
        try:
            weights = [float(w) for w in args.tenant_weights.split(",")]
        except ValueError:
            raise ValueError(f"--tenant-weights {args.tenant_weights!r}: expected numbers like 3,1,1") from None
    try:
        extra = json.loads(args.extra_body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body is not JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    if args.ignore_eos:
        extra["ignore_eos"] = True
    workload = Workload(
        models=models,
        tenants=tenants,
        prompt_words=LengthDist.parse(args.prompt_words),
        max_tokens=LengthDist.parse(args.max_tokens),
        zipf_exponent=args.zipf,
        tenant_weights=weights,
        seed=args.seed,
        sampling=args.sampling,
    )
    return LoadConfig(
        url=args.url,
        workload=workload,
        rate=args.rate,
        concurrency=args.concurrency,
        duration_s=args.duration,
        requests=args.requests,
        endpoint=args.endpoint,
        extra_body=extra,
        timeout_s=args.timeout,
        drain_s=args.drain,
        max_in_flight=args.max_in_flight,
        allow_remote=args.allow_remote,
        processes=args.processes,
    )


async def _run_with_ctrl_c(config: LoadConfig) -> dict[str, Any]:
    """Ctrl-C stops sending and drains, so an interrupted run still writes its report; a second Ctrl-C aborts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # back to KeyboardInterrupt for the next one

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        return await run_load(config, stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        report = asyncio.run(_run_with_ctrl_c(config))
    except KeyboardInterrupt:
        print("loadgen: interrupted twice, no report written", file=sys.stderr)
        return 130
    print(summary_text(report))
    try:
        args.json = args.json or dated_json_path("loadgen")
        write_json(report, args.json)
        print(f"report: {args.json}")
        if not args.no_plot:
            png = args.png or args.json.with_suffix(".png")
            try:
                plot(report, png)
                print(f"plot: {png}")
            except ModuleNotFoundError as exc:
                if not (exc.name or "").startswith("matplotlib"):
                    raise
                print(
                    f"plot: not drawn, matplotlib is not installed: `pip install matplotlib` (or `make serve`, which "
                    f"installs it), then run again, or plot {args.json} yourself: it holds every request and the "
                    "timeline"
                )
    except OSError as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr)
        return 1
    failed = report["requests"]["failed"] + report["requests"]["dropped"]
    return 1 if args.fail_on_errors and failed else 0


if __name__ == "__main__":
    sys.exit(main())
