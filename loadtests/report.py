"""Turn request records into the run's report (a JSON-ready dict) and a PNG of latency and throughput over time."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.client import RequestRecord

PERCENTILES = (50, 90, 99)


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99, mean and max in seconds (None when there are no samples) and the sample count."""
    if not values:
        return {"count": 0, "mean": None, "max": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    summary: dict[str, float | int | None] = {"count": len(values), "mean": float(array.mean())}
    summary.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    summary["max"] = float(array.max())
    return summary


def shares(records: list[RequestRecord], key: str, names: list[str]) -> dict[str, dict[str, float | int]]:
    """Per tenant (or per model): requests sent, completed, failed, output tokens and the share of requests sent."""
    sent = Counter(getattr(r, key) for r in records)
    total = max(1, len(records))
    table: dict[str, dict[str, float | int]] = {}
    for name in names:
        mine = [r for r in records if getattr(r, key) == name]
        completed = [r for r in mine if r.ok]
        table[name] = {
            "sent": sent[name],
            "completed": len(completed),
            "failed": len(mine) - len(completed),
            "output_tokens": sum(r.output_tokens for r in completed),
            "share": sent[name] / total,
        }
    return table


def build_report(
    records: list[RequestRecord],
    *,
    config: dict[str, Any],
    tenants: list[str],
    models: list[str],
    wall_s: float,
    dropped: int,
    started_at: str,
) -> dict[str, Any]:
    """The run's report. Throughput counts completed requests only, over the whole run (first send to last
    answer, drain included); latencies are over completed requests."""
    completed = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    output_tokens = sum(r.output_tokens for r in completed)
    errors = Counter(r.error for r in failed if r.error)
    examples: dict[str, str] = {}
    for r in failed:
        if r.error and r.error not in examples:
            examples[r.error] = r.message or ""
    window = max(wall_s, 1e-9)
    return {
        "started_at": started_at,
        "wall_s": wall_s,
        "config": config,
        "requests": {
            "sent": len(records),
            "completed": len(completed),
            "failed": len(failed),
            # Open-loop arrivals that found the client at its in-flight limit and were not sent.
            "dropped": dropped,
            "without_usage": sum(1 for r in completed if not r.usage_reported),
        },
        "throughput": {
            "requests_per_s": len(completed) / window,
            "output_tokens_per_s": output_tokens / window,
        },
        "tokens": {
            "output": output_tokens,
            "prompt": sum(r.prompt_tokens or 0 for r in completed),
        },
        "latency_s": {
            "ttft": latency_summary([r.ttft for r in completed if r.ttft is not None]),
            "tpot": latency_summary([r.tpot for r in completed if r.tpot is not None]),
            "e2e": latency_summary([r.e2e for r in completed if r.e2e is not None]),
        },
        "errors": dict(sorted(errors.items())),
        "error_examples": dict(sorted(examples.items())),
        "tenants": shares(records, "tenant", tenants),
        "models": shares(records, "model", models),
        "timeline": timeline(records, wall_s),
        "samples": [_sample(r) for r in records],
    }


def _sample(r: RequestRecord) -> dict[str, Any]:
    return {
        "index": r.index,
        "tenant": r.tenant,
        "model": r.model,
        "prompt_words": r.prompt_words,
        "max_tokens": r.max_tokens,
        "start_s": r.start,
        "ttft_s": r.ttft,
        "e2e_s": r.e2e,
        "output_tokens": r.output_tokens,
        "error": r.error,
        "status": r.status,
    }


def timeline(records: list[RequestRecord], wall_s: float, bins: int = 60) -> dict[str, Any]:
    """Per time bin: completions/s, output tokens/s (each request's tokens spread evenly from its first to its last
    token), errors, and the p50/p99 end-to-end latency of the requests that finished in the bin."""
    width = _bin_width(wall_s, bins)
    count = max(1, math.ceil(wall_s / width))
    edges = np.arange(count + 1) * width
    tokens = np.zeros(count)
    completions = np.zeros(count, dtype=np.int64)
    errors = np.zeros(count, dtype=np.int64)
    finished: list[list[float]] = [[] for _ in range(count)]
    for r in records:
        if r.end is None:
            continue
        b = min(int(r.end // width), count - 1)
        if not r.ok:
            errors[b] += 1
            continue
        completions[b] += 1
        finished[b].append(r.e2e or 0.0)
        if r.output_tokens and r.first_token is not None and r.last_token is not None:
            tokens += r.output_tokens * _overlap(edges, r.first_token, r.last_token)
    return {
        "bin_s": width,
        "t_s": edges[:-1].tolist(),
        "requests_per_s": (completions / width).tolist(),
        "output_tokens_per_s": (tokens / width).tolist(),
        "errors": errors.tolist(),
        "e2e_p50_s": [float(np.percentile(v, 50)) if v else None for v in finished],
        "e2e_p99_s": [float(np.percentile(v, 99)) if v else None for v in finished],
    }


def _bin_width(wall_s: float, bins: int) -> float:
    """A round bin width (0.1, 0.2, 0.5, 1, 2, 5, ... seconds) giving at most about `bins` bins."""
    target = max(wall_s, 1e-3) / bins
    for width in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if width >= target:
            return float(width)
    return float(math.ceil(target / 600) * 600)


def _overlap(edges: np.ndarray, start: float, end: float) -> np.ndarray:
    """Fraction of [start, end] inside each bin (all in the bin holding `start` when start == end)."""
    if end <= start:
        fractions = np.zeros(len(edges) - 1)
        fractions[min(int(np.searchsorted(edges, start, side="right")) - 1, len(fractions) - 1)] = 1.0
        return fractions
    inside = np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], start), 0.0, None)
    return inside / (end - start)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    """Two panels over the run's time: latency (each request's TTFT and end-to-end latency as points at its
    finish time, with per-bin p50/p99 lines) and throughput (output tokens/s and completed requests/s)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    done = [s for s in report["samples"] if s["error"] is None and s["e2e_s"] is not None]
    failed = [s for s in report["samples"] if s["error"] is not None and s["e2e_s"] is not None]
    line = report["timeline"]
    centers = [t + line["bin_s"] / 2 for t in line["t_s"]]

    fig, (lat, thr) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    lat.scatter([s["start_s"] + s["e2e_s"] for s in done], [s["e2e_s"] for s in done], s=6, alpha=0.4, label="e2e")
    lat.scatter(
        [s["start_s"] + s["ttft_s"] for s in done if s["ttft_s"] is not None],
        [s["ttft_s"] for s in done if s["ttft_s"] is not None],
        s=6,
        alpha=0.4,
        label="TTFT",
    )
    for key, style in (("e2e_p50_s", "-"), ("e2e_p99_s", "--")):
        points = [(c, v) for c, v in zip(centers, line[key], strict=True) if v is not None]
        if points:
            xs, ys = [c for c, _ in points], [v for _, v in points]
            lat.plot(xs, ys, style, color="black", linewidth=1, label=f"e2e {key[4:7]} per bin")
    if failed:
        lat.scatter(
            [s["start_s"] + s["e2e_s"] for s in failed],
            [s["e2e_s"] for s in failed],
            marker="x",
            color="red",
            s=14,
            label="failed",
        )
    lat.set_ylabel("latency (s)")
    lat.set_title(_title(report))
    lat.legend(loc="upper left", fontsize=8)
    lat.grid(alpha=0.3)

    thr.plot(centers, line["output_tokens_per_s"], color="tab:blue", label="output tokens/s")
    thr.set_ylabel("output tokens/s")
    thr.set_xlabel(f"time since start (s), bins of {line['bin_s']:g} s")
    thr.grid(alpha=0.3)
    req = thr.twinx()
    req.plot(centers, line["requests_per_s"], color="tab:orange", label="completed requests/s")
    req.set_ylabel("requests/s")
    handles = thr.get_legend_handles_labels()[0] + req.get_legend_handles_labels()[0]
    thr.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _title(report: dict[str, Any]) -> str:
    arrival = report["config"]["arrival"]
    poisson = arrival["mode"] == "poisson"
    load = f"Poisson {arrival['rate']:g} req/s" if poisson else f"{arrival['concurrency']} in flight"
    req = report["requests"]
    return f"{report['config']['url']}: {load}, {req['completed']}/{req['sent']} completed, {req['failed']} failed"


def summary_text(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    req, thr, lat = report["requests"], report["throughput"], report["latency_s"]

    def row(name: str) -> str:
        s = lat[name]
        if not s["count"]:
            return f"  {name:5s} (no samples)"
        return f"  {name:5s} p50 {s['p50'] * 1e3:9.1f} ms  p90 {s['p90'] * 1e3:9.1f} ms  p99 {s['p99'] * 1e3:9.1f} ms"

    lines = [
        f"requests: {req['sent']} sent, {req['completed']} completed, {req['failed']} failed, "
        f"{req['dropped']} dropped in {report['wall_s']:.1f} s",
        f"throughput: {thr['requests_per_s']:.2f} req/s, {thr['output_tokens_per_s']:.1f} output tokens/s",
        row("ttft"),
        row("tpot"),
        row("e2e"),
    ]
    if report["errors"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in report["errors"].items()))
    lines.append("tenants: " + ", ".join(f"{k} {v['share']:.1%}" for k, v in report["tenants"].items()))
    return "\n".join(lines)
