"""Host time of a slot write (`SlotWriter.write`) for W2-shaped adapters: what the step loop spends queuing the
copies of an adapter it puts into a slot (it does so while the device computes a step).

    python loadtests/bench_slot_write.py [--slots 64] [--layers 32] [--rounds 5] [--row-major] [--fresh]

Adapters of ranks 8, 16, 32 and 64 on q_proj and v_proj of every layer, written into every slot in turn so that a
slot's rank changes with each write; the model has the 8B shape's layer count and module names but small matrices,
so that the Python work shows rather than the copies. On a GPU the copies are asynchronous launches and the figure
is the host time until each write returned, as the step loop spends it (the copies are waited for at the end of each
round, untimed). `--row-major`: buffers with B as files hold it (what a GPU engine's CPU cache keeps), else
rank-major. `--fresh`: every write by a writer that has not met its adapter's layout yet (it works out the copies
anew). Prints the fastest round's mean and a profile of one round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_engine import build_base, write_adapter
from loadtests.profiling import top_functions
from loadtests.record import help_text
from loramux.server.engine.slot_writer import SlotWriter
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.lora_weights import load_lora

RANKS = (8, 16, 32, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--slots", type=int, default=64, help="slots written in turn (each of rank 64)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (7 LoRA modules each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of one write into every slot")
    parser.add_argument("--row-major", action="store_true", help="B in the buffers as files hold it")
    parser.add_argument(
        "--fresh", action="store_true", help="each write by a new writer (its copies worked out anew, untimed)"
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/loramux-bench-slot-write"), help="where adapters go")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": args.layers,
             "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 500000.0,
             "max_position_embeddings": 256}  # fmt: skip
    base = build_base(shape, device)
    base.model.allocate_lora_slots(SlotLayout.of(args.slots, 64, 64))  # one page per slot: every slot takes any rank
    writer = SlotWriter(base.model)
    adapters = [
        load_lora(write_adapter(args.root / f"r{r}", r, ["q_proj", "v_proj"], base.config, seed=r), base.config,
                  writer.dtype, b_rank_major=not args.row_major)
        for r in RANKS
    ]  # fmt: skip

    def one_round(shift: int) -> float:
        seconds = 0.0
        for slot in range(args.slots):
            this = SlotWriter(base.model) if args.fresh else writer
            started = time.perf_counter()
            this.write(slot, adapters[(slot + shift) % len(adapters)])
            seconds += time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seconds / args.slots

    one_round(0)  # first writes: staging buffers, views, kernels
    seconds = min(one_round(shift) for shift in range(1, args.rounds + 1))
    print(f"slot write: {1e3 * seconds:.3f} ms a write ({args.slots} slots, {args.layers} layers, "
          f"{'row' if args.row_major else 'rank'}-major B, {'fresh, ' if args.fresh else ''}{device.type})",
          flush=True)  # fmt: skip
    print(top_functions(lambda: one_round(args.rounds + 1), lines=8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
