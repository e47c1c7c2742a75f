"""Time of one batched sampling call (`layers/sampler.py`) by batch size, vocabulary and sampling mix.

    python loadtests/bench_sampler.py [--batches 1,8,32,64,128,256] [--vocabs 49152,128256] [--device cuda]
                                      [--mixes greedy,t1,top_p,mix] [--calls 50] [--threads N]
                                      [--json PATH]

Each call samples a batch of rows whose logits look like a language model's (a Zipf-like fall-off over a shuffled
vocabulary, top token a few percent to tens of percent likely), as the engine calls it once per step: the rows
stacked, the tokens back on the host. Mixes: `greedy` (temperature 0), `t1` (temperature 1.0, OpenAI's default),
`top_p` (temperature 1.0, top_p 0.9), `mix` (what a server sees: temperature 0.7 with top_p 0.9, a quarter greedy,
the default, seeded rows, top-k 40, min-p, penalties over a 100-token prompt and 64 generated tokens, logprobs).
Prints the median milliseconds per call, and how often a call needed its second transfer (top-p rows not accepted
within the rounds on the device); `--json` writes every figure. On a GPU it prints a second table, the milliseconds
a call costs when the device is still busy with the step's forward while the sampler queues its work (as in the
engine, where the host's launches hide behind the forward): each call behind a 30 ms device sleep, timed from the
sleep's end to the tokens on the host.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.record import help_text
from loramux.server.engine.request import SamplingParams
from loramux.server.layers import sampler as sampler_module
from loramux.server.layers.sampler import Sampler


class Row:
    """What the sampler reads of a request."""

    def __init__(self, params: SamplingParams, prompt: list[int], output: list[int]) -> None:
        self.params, self.prompt_ids, self.output_ids, self.generator = params, prompt, output, None


def mix_params(kind: str, i: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0.0)
    if kind == "t1":
        return SamplingParams(temperature=1.0)
    if kind == "top_p":
        return SamplingParams(temperature=1.0, top_p=0.9)
    slot = i % 20  # the realistic mix, in twentieths (a batch of one: its most common setting)
    if slot < 6:
        return SamplingParams(temperature=0.7, top_p=0.9)
    if slot < 11:
        return SamplingParams(temperature=0.0)
    if slot < 14:
        return SamplingParams(temperature=1.0)
    if slot < 16:
        return SamplingParams(temperature=0.8, top_p=0.95, seed=i)
    if slot == 16:
        return SamplingParams(temperature=0.9, top_k=40)
    if slot == 17:
        return SamplingParams(temperature=1.0, min_p=0.05)
    if slot == 18:
        return SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
    return SamplingParams(temperature=0.7, top_p=0.9, logprobs=5)


def lm_like_logits(n: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """(n, vocab) fp32: -1.1 * log(rank) plus noise, over a vocabulary shuffled per row."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    rows = []
    for _ in range(n):
        row = -1.1 * ranks.log() + 0.3 * torch.randn(vocab, generator=g) + 4 * torch.rand(1, generator=g)
        rows.append(row[torch.randperm(vocab, generator=g)])
    return torch.stack(rows).to(device)


def time_calls(
    sampler: Sampler, logits: torch.Tensor, rows: list[Row], calls: int
) -> tuple[list[float], list[float], int]:
    """Milliseconds of each call (the device idle before it), of each call behind a device sleep (a GPU only), and
    the calls that needed their second transfer."""
    seconds, behind, second_looks = [], [], 0
    finish = sampler_module._Nucleus.finish
    looks = [0]

    def counted(self, *args):
        looks[0] += 1
        return finish(self, *args)

    sampler_module._Nucleus.finish = counted
    try:
        for _ in range(3):  # warm-up
            sampler.sample(logits, rows)
        looks[0] = 0
        for _ in range(calls):
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            began = time.perf_counter()
            sampler.sample(logits, rows)  # returns host lists: the device's work is done
            seconds.append(1e3 * (time.perf_counter() - began))
        second_looks = looks[0]
        if logits.device.type == "cuda":
            for _ in range(calls):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(logits.device)
                torch.cuda._sleep(60_000_000)  # about 30 ms of device time: the forward the launches hide behind
                start.record()
                sampler.sample(logits, rows)
                end.record()
                end.synchronize()
                behind.append(start.elapsed_time(end))
    finally:
        sampler_module._Nucleus.finish = finish
    return seconds, behind, second_looks


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--batches", default="1,8,32,64,128,256", help="rows per call")
    parser.add_argument("--vocabs", default="49152,128256", help="vocabulary sizes (SmolLM2's, Llama 3's)")
    parser.add_argument("--mixes", default="greedy,t1,top_p,mix", help="sampling settings of the rows")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per figure")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = [int(b) for b in args.batches.split(",")]
    mixes = args.mixes.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"sampler on {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        sampler = Sampler(vocab, device)
        all_logits = lm_like_logits(max(batches), vocab, device, seed=vocab)
        lines, hidden = [], []
        for n in batches:
            line, line_behind = [], []
            for mix in mixes:
                rows = [Row(mix_params(mix, i), list(range(100)), list(range(100, 164))) for i in range(n)]
                ms, behind, second_looks = time_calls(sampler, all_logits[:n].contiguous(), rows, args.calls)
                results.append(
                    {"vocab": vocab, "batch": n, "mix": mix, "median_ms": statistics.median(ms), "ms": ms,
                     "behind_forward_median_ms": statistics.median(behind) if behind else None,
                     "behind_forward_ms": behind, "second_transfers": second_looks, "calls": args.calls}
                )  # fmt: skip
                mark = "*" if second_looks else " "
                line.append(f"{statistics.median(ms):9.3f}{mark}")
                line_behind.append(f"{statistics.median(behind):9.3f}{mark}" if behind else "")
            lines.append(f"{n:>6} " + " ".join(line))
            hidden.append(f"{n:>6} " + " ".join(line_behind))
        header = f"{'batch':>6} " + " ".join(f"{m:>10}" for m in mixes)
        print(f"\nvocab {vocab} (block {sampler.block}): median ms per call", header, *lines, sep="\n")
        if device.type == "cuda":
            print(f"\nvocab {vocab}: median ms per call behind the forward", header, *hidden, sep="\n")
    print("\n* some calls needed the second transfer (top-p rows left to the exact fallback); see --json")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "commit": commit(),
            "top_p_rounds": sampler_module.TOP_P_ROUNDS,
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
