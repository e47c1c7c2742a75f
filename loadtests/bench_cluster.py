"""Replicas on Ray Serve under W2-like traffic: many adapters with Zipf popularity and Poisson arrivals, sent by the
load generator to `loramux cluster serve --replicas N` for each N (default 1 and 2), and to one `loramux serve` beside
them (the same engine without Ray: what the proxy, the ingress and the routing cost). Reports each configuration's
throughput and latencies, the scaling of N replicas over 1, and the adapter affinity (the share of adapter requests
that reached a replica which held the adapter already, from the deployment's /metrics).

    python loadtests/bench_cluster.py                 # GPUs: one per replica, the Llama-3-8B shape, 1,000 adapters
    python loadtests/bench_cluster.py --tiny          # the CPU: a tiny model, one process per replica, 64 adapters

1. Writes a checkpoint of random weights of the shape with the default model's tokenizer (as bench_serve.py does) and
   the adapters (ranks 8 to 64 on q_proj and v_proj; four weights files shared by name, as bench_serve.py's W2).
2. For each configuration: starts it on a fresh copy of nothing but the registry's data directory (the adapters
   are pushed once, through the first one's hub routes), sends a short warm-up, then the load: `--requests`
   streaming completions at `--rate` requests/s (Poisson), adapters drawn with Zipf popularity (exponent 1), the
   sampling mix; stops it.
3. Prints a table and writes one JSON (by default a new dated file under loadtests/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_serve import (
    SHAPES,
    default_tokenizer_dir,
    free_port,
    loadgen,
    push_many,
    summary,
    write_adapter,
    write_checkpoint,
)
from loadtests.record import REPO, commit, dated_json_path, help_text, workdir

PLANS = {
    "gpu": {"shape": "llama3-8b", "adapters": 1000, "ranks": (8, 16, 32, 64), "requests": 1024, "rate": 200.0,
            "max_tokens": 128, "prompt_words": 96, "warm": 64,
            "server": ["--slots", "64", "--max-lora-rank", "64"]},
    "tiny": {"shape": "tiny", "adapters": 64, "ranks": (8, 16), "requests": 600, "rate": 14.0, "max_tokens": 32,
             "prompt_words": 24, "warm": 16,
             "server": ["--slots", "8", "--max-lora-rank", "16", "--max-num-seqs", "16", "--max-model-len", "512"]},
}  # fmt: skip


def start(command: list[str], home: Path, env: dict[str, str], timeout: float = 900) -> tuple:
    """`loramux COMMAND --port P ...` as a process of its own; waits for /ready -> (process, url, seconds)."""
    import httpx

    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"{command[0]}-{port}.log"
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "loramux.cli", *command, "--port", str(port)], env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"loramux {command[0]} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"loramux {command[0]} was not ready in {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(180)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def routed(url: str) -> dict[str, float]:
    """The deployment's counts of adapter requests by whether the replica held the adapter (empty for one server)."""
    import httpx

    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("loramux_routed_adapter_requests_total{"):
            counts[line.split('resident="')[1].split('"')[0]] = float(line.rpartition(" ")[2])
    return counts


def affinity(before: dict[str, float], after: dict[str, float]) -> dict | None:
    resident = after.get("true", 0) - before.get("true", 0)
    other = after.get("false", 0) - before.get("false", 0)
    if resident + other == 0:
        return None
    return {"share": resident / (resident + other), "resident": resident, "not_resident": other}


def measure(name: str, command: list[str], root: Path, env: dict, plan: dict, models: list[str], adapters) -> dict:
    """One configuration: start it, push the adapters (when `adapters`), warm up, run the load, stop it."""
    process, url, ready_s = start(command, root / f"home-{name}", env)
    print(f"{name}: ready in {ready_s:.0f}s", flush=True)
    figures: dict = {"command": " ".join(["loramux", *command]), "ready_seconds": ready_s}
    try:
        if adapters:
            started = time.perf_counter()
            push_many(adapters, url)
            figures["push_seconds"] = time.perf_counter() - started
        common = {"models": models, "prompt_words": plan["prompt_words"], "zipf": 1.0, "sampling": "mix"}
        loadgen(url, root / f"{name}-warm.json", requests=plan["warm"], concurrency=plan["warm"], max_tokens=4,
                **common)  # fmt: skip
        before = routed(url)
        report = loadgen(url, root / f"{name}.json", requests=plan["requests"], rate=plan["rate"],
                         max_tokens=plan["max_tokens"], **common)  # fmt: skip
        figures |= summary(report)
        figures["requests_per_s"] = report["requests"]["completed"] / report["wall_s"]
        figures["affinity"] = affinity(before, routed(url))
    finally:
        figures["exit_status"] = stop(process)
    print(f"{name}: {figures['tokens_per_s']:.1f} tokens/s, TTFT p50 {figures['ttft_p50_s']:.3f}s", flush=True)
    return figures


def run(args: argparse.Namespace, root: Path, results: dict) -> None:
    plan = results["plan"]
    shape = SHAPES[plan["shape"]]
    env = {**os.environ, "LORAMUX_HOME": str(root / "home")}
    env.pop("HF_HUB_OFFLINE", None)  # the pushes go to the servers started here, and nowhere else
    if args.device == "cpu":  # a tiny model needs no intra-op threads: the cores go to the processes
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    checkpoint = root / "checkpoint"
    if not (checkpoint / "config.json").exists():  # a --workdir keeps it for the next run
        write_checkpoint(checkpoint, shape, default_tokenizer_dir(), args.device)
    ranks = plan["ranks"]
    shared = {r: write_adapter(root / "adapters" / f"r{r}", shape, r, ["q_proj", "v_proj"], seed=100 + r)
              for r in ranks}  # fmt: skip
    adapters = [(shared[ranks[i % len(ranks)]], f"bench/w2-{i}") for i in range(plan["adapters"])]
    models = [name for _, name in adapters]
    server = ["--base", str(checkpoint), "--data-dir", str(root / "data"), "--device", args.device, *plan["server"]]
    pushed = (root / "data").exists()
    configurations = [(f"replicas_{n}", ["cluster", "serve", "--replicas", str(n), *server]) for n in args.replicas]
    if args.baseline:
        configurations.append(("serve", ["serve", *server]))
    for name, command in configurations:
        try:
            results["runs"][name] = measure(name, command, root, env, plan, models, None if pushed else adapters)
            pushed = True
        except Exception as exc:  # the other configurations still run
            results["failures"][name] = f"{type(exc).__name__}: {exc}"[:3000]
            print(f"{name} failed: {results['failures'][name][:500]}", flush=True)
        save(args, results)


def scaling(results: dict) -> dict:
    runs, ratios = results["runs"], {}
    one = runs.get("replicas_1")
    for name, figures in runs.items():
        if one and name.startswith("replicas_") and name != "replicas_1":
            n = name.removeprefix("replicas_")
            ratios[f"tokens_per_s_{n}_over_1"] = figures["tokens_per_s"] / one["tokens_per_s"]
            ratios[f"ttft_p50_{n}_over_1"] = figures["ttft_p50_s"] / max(one["ttft_p50_s"], 1e-9)
    if one and "serve" in runs:
        ratios["tokens_per_s_1_replica_over_serve"] = one["tokens_per_s"] / runs["serve"]["tokens_per_s"]
    return ratios


def table(results: dict) -> str:
    lines = [f"{'configuration':<12} {'tokens/s':>9} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
             f"{'TPOT p50':>9} {'failed':>6} {'affinity':>8}"]  # fmt: skip
    for name, f in results["runs"].items():
        share = f"{f['affinity']['share']:.3f}" if f.get("affinity") else "-"
        figures = f"{f['tokens_per_s']:>9.1f} {f['requests_per_s']:>7.2f} {f['ttft_p50_s']:>9.3f} "
        figures += f"{f['ttft_p99_s']:>9.3f} {f['tpot_p50_s']:>9.4f} {f['requests_failed']:>6} {share:>8}"
        lines.append(f"{name:<12} {figures}")
    lines += [f"{key}: {value:.3f}" for key, value in results.get("scaling", {}).items()]
    return "\n".join(lines)


def save(args: argparse.Namespace, results: dict) -> None:
    results["scaling"] = scaling(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=help_text(__doc__))
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, one process per replica")
    p.add_argument("--replicas", default="1,2", help="the replica counts to measure, e.g. 1,2,4 (default 1,2)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="leave out the one `loramux serve`")
    p.add_argument("--requests", type=int, help="requests of each run (default 1024; --tiny 600)")
    p.add_argument("--rate", type=float, help="Poisson arrivals, requests/s (default 200; --tiny 14)")
    p.add_argument("--adapters", type=int, help="adapters, Zipf popularity (default 1000; --tiny 64)")
    p.add_argument("--workdir", type=Path, help="keep the checkpoint, data and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="default: a new dated file under loadtests/results/")
    args = p.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    try:
        args.replicas = sorted({int(n) for n in args.replicas.split(",")})
    except ValueError:
        p.error(f"--replicas: whole numbers separated by commas, got {args.replicas!r}")
    if not args.replicas or args.replicas[0] < 1:
        p.error("--replicas: each count must be at least 1")
    args.json = args.json or dated_json_path("cluster")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = dict(PLANS["tiny" if args.tiny else "gpu"])
    plan |= {key: getattr(args, key) for key in ("requests", "rate", "adapters") if getattr(args, key) is not None}
    results: dict = {
        "command": " ".join(["python", "loadtests/bench_cluster.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(), "device": args.device,
        "python": platform.python_version(), "cpus": os.cpu_count(), "plan": plan, "runs": {}, "failures": {},
        "load_average_at_start": os.getloadavg(),  # other work on the machine shares its cores
    }  # fmt: skip
    try:
        with workdir(args.workdir, "loramux-bench-cluster-") as root:
            run(args, root, results)
    finally:  # what was measured is kept even when a later part failed
        save(args, results)
        print(table(results))
        print(f"wrote {args.json}")
    return 0 if not results["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
