"""W2's scheduling on the CPU, without a model: the engine's own Scheduler and AdapterSlots (slot writes do
nothing) driven by W2's workload on a simulated clock, each step costed by a model fitted to GPU runs (`--costs`):

- h100-eager (the default; fitted to `bench_engine.py` runs on an H100, 2026-11-23, with eager prompt passes): a
  decode step 24.5 ms + 0.04 ms a sequence (29 ms at W2's ~124, 35 ms at W1's 256); a step with prompt tokens adds an
  eager pass, 85 ms + 0.018 ms a prompt token.
- h200-graphs (fitted to runs on an H200, 2026-11-29, prompt passes through piecewise graphs): a decode step 17 ms +
  0.05 ms a sequence; a pass over prompt chunks 13.5 ms + 0.029 ms a prompt token.

Prints steps, the mean running batch, simulated tokens/s and TTFT, so that scheduling policies can be compared in
seconds, deterministically.

    python loadtests/sim_scheduler.py [--slots 64] [--requests 512] [--adapters 1000] [--rate 100] [--page-rank 8]
        [--costs h100-eager|h200-graphs]

Adapter i has rank 8, 16, 32 or 64 (i mod 4), as in bench_engine.py; `--page-rank 64` gives one adapter per slot
whatever its rank (slot memory not paged).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.record import help_text
from loramux.core.adapter_source import AdapterRef
from loramux.server.engine.adapter_slots import AdapterSlots
from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, SamplingParams
from loramux.server.engine.scheduler import Scheduler
from loramux.server.layers.slots import SlotLayout

BLOCK = 16
RANKS = (8, 16, 32, 64)  # adapter i has rank RANKS[i % 4] (bench_engine.py's W2)


# seconds: a decode step's fixed part and per sequence, a prompt pass's fixed part and per prompt token
COSTS = {"h100-eager": (0.0245, 0.00004, 0.085, 0.000018), "h200-graphs": (0.017, 0.00005, 0.0135, 0.000029)}


class NoCopies:
    """Slot writes that copy nothing and are done once issued."""

    def fence(self) -> None:
        return None

    def write(self, slot: int, weights: object, after: object) -> None:
        return None


def step_seconds(decode: int, prompt_tokens: int, costs: str = "h100-eager") -> float:
    decode_fixed, per_sequence, pass_fixed, per_token = COSTS[costs]
    seconds = decode_fixed + per_sequence * decode if decode else 0.0
    if prompt_tokens:
        seconds += pass_fixed + per_token * prompt_tokens
    return seconds


def simulate(args: argparse.Namespace) -> dict:
    rng = random.Random(3)  # W2's seeds: the same adapters and arrival times as bench_engine.py
    weights = [1.0 / (k + 1) for k in range(args.adapters)]
    chosen = rng.choices(range(args.adapters), weights=weights, k=args.requests)
    arrivals, t = [], 0.0
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        arrivals.append(t)
    blocks = args.max_seqs * -(-(args.prompt + args.gen) // BLOCK) + 64
    slots = AdapterSlots(SlotLayout.of(args.slots, 64, args.page_rank), NoCopies())  # type: ignore[arg-type]
    scheduler = Scheduler(BlockManager(blocks, BLOCK), slots, args.max_seqs, args.max_batched_tokens)
    params = SamplingParams(max_tokens=args.gen, temperature=0.0, ignore_eos=True)
    requests = []
    for i, adapter in enumerate(chosen):
        r = Request(str(i), [1] * args.prompt, params, AdapterRef(f"w2/{adapter}"), None, set())
        r.adapter_key = f"w2/{adapter}@{'0' * 40}"
        r.lora = SimpleNamespace(max_rank=RANKS[adapter % len(RANKS)])  # what the claim reads of the weights
        requests.append(r)
    first: dict[int, float] = {}
    now, added, done, steps, mixed, running = 0.0, 0, 0, 0, 0, []
    while done < len(requests):
        while added < len(requests) and arrivals[added] <= now:
            scheduler.add(requests[added])
            added += 1
        batch = scheduler.schedule()
        slots.issue_writes()  # as the engine issues them after the step's forward: ready for the next step
        if not batch:
            now = arrivals[added] if added < len(requests) else now + 0.001
            continue
        decode = sum(n == 1 for _, n in batch)
        prompt_tokens = sum(n for _, n in batch if n > 1)
        now += step_seconds(decode, prompt_tokens, args.costs)
        steps += 1
        mixed += bool(decode and prompt_tokens)
        running.append(len(scheduler.running))
        for r, n in batch:
            r.num_computed += n
            if r.num_computed >= r.num_tokens:
                r.output_ids.append(0)
                first.setdefault(int(r.request_id), now)
                if len(r.output_ids) == args.gen:
                    scheduler.finish(r)
                    done += 1
    ttft = sorted(first[i] - arrivals[i] for i in range(len(requests)))
    return {
        "slots": args.slots, "page_rank": slots.layout.page_rank, "steps": steps, "mixed_steps": mixed,
        "running_mean": statistics.mean(running),
        "seconds": now, "tokens_per_s": len(requests) * args.gen / now, "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "slot_loads": scheduler.slot_misses,
        "distinct_adapters": len(set(chosen)),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=help_text(__doc__))
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="Poisson arrivals per second")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--max-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--page-rank", type=int, default=None, help="rows of a page of slot memory (default 8)")
    p.add_argument("--costs", choices=sorted(COSTS), default="h100-eager", help="the step cost model (see above)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(simulate(parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
