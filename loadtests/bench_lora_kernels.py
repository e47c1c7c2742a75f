"""Micro-benchmark of the Triton LoRA kernels against the torch reference (gather + bmm), on Llama-3-8B shapes.

    python loadtests/bench_lora_kernels.py --json kernels.json

For every module shape (q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336, down 14336->4096), batch (1, 32, 256
decode tokens, round-robin over the adapters; a 2048-token prefill, 32 sequences of 64 tokens) and adapter mix (32
adapters of rank 16; 32 adapters of mixed ranks 8 to 64 in r_max 64 slots) it times one LoRA application,
`y += s·(x·Aᵀ)·Bᵀ`, through: the torch reference, the kernels' gather path, their segment path (with the batch's
segment plan made once, as the engine does, and timed on its own). Then fused q/k/v and gate/up against separate calls.
`--mixes paged` times what a 256-token decode step of W1 runs in the engine: 32 rank-16 adapters in the paged slot
memory of `serve --slots 64 --max-lora-rank 64` (512 pages of rank 8, views of max rank 64, a plan over every page).

Each figure is the median over replays of a CUDA graph of many calls, each call reading another copy of the weights so
that they come from memory and not from L2 (as in a model, where every layer has its own). GB/s counts the bytes a
call must move at least: x, the used slots' A and B up to their true rank, y read and written.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.record import commit, dated_json_path, help_text
from loramux.server.layers import lora_kernels as lk
from loramux.server.layers.lora import _b_views, _page_views
from loramux.server.layers.slots import SlotLayout

MODULES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
BATCHES = {"decode-1": 1, "decode-32": 32, "decode-256": 256, "prefill-2048": 2048}
NUM_ADAPTERS = 32
MIXED_RANKS = (8, 16, 32, 64)
MIXES = ("r16", "mixed", "paged")
PAGED = SlotLayout.of(64, 64)  # the slot memory of `serve --slots 64 --max-lora-rank 64`, as bench_serve runs it
L2_FLUSH_BYTES = 200 * 2**20  # weight copies rotate through more than 4x the H100's 50 MB of L2
DTYPE = torch.bfloat16


@dataclass
class Row:
    case: str
    module: str
    batch: str
    adapters: str
    impl: str
    us: float
    gbps: float
    rel_err: float | None = None


def token_slots(batch: str, tokens: int, device: str, mix: str = "r16") -> torch.Tensor:
    if batch.startswith("prefill"):  # sequences of tokens/32 tokens, each sequence its own adapter
        slots = torch.arange(tokens, device=device) // (tokens // NUM_ADAPTERS)
    else:  # decode: one token per request, requests round-robin over the adapters
        slots = torch.arange(tokens, device=device) % NUM_ADAPTERS
    if mix == "paged":  # a slot index is an adapter's first page: a rank-16 adapter holds two pages of rank 8
        slots = slots * PAGED.pages_for(16)
    return slots.to(torch.int32)


def adapters_of(slots: torch.Tensor, mix: str) -> torch.Tensor:
    """Each token's adapter (0..31) from its slot index."""
    return slots // PAGED.pages_for(16) if mix == "paged" else slots


def num_slots(mix: str) -> int:
    """The slot indices a plan ranges over."""
    return PAGED.pages if mix == "paged" else NUM_ADAPTERS


def adapter_ranks(mix: str) -> tuple[int, list[int]]:
    """(r_max, true rank per adapter)."""
    if mix == "r16":
        return 16, [16] * NUM_ADAPTERS
    if mix == "paged":
        return PAGED.max_rank, [16] * NUM_ADAPTERS
    return max(MIXED_RANKS), [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(NUM_ADAPTERS)]


# How B's memory is laid out: "slot" (S, out, r_max) contiguous; "out-major" one (out, S·r_max) memory with slot s
# at column s·r_max (the engine's paged memory before 2026-11-23's change); "rank-major" one (S·r_max, out) memory
# with slot s at row s·r_max (the engine's paged memory since).
B_LAYOUTS = ("slot", "out-major", "rank-major")


def b_stack(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` (S, out, r_max) in a memory of `layout`, as an (S, out, r_max) view."""
    slots, n, r_max = values.shape
    if layout == "slot":
        return values.contiguous()
    if layout == "out-major":
        view = values.new_empty(n, slots * r_max).as_strided(values.shape, (r_max, slots * r_max, 1))
    else:
        view = values.new_empty(slots * r_max, n).as_strided(values.shape, (r_max * n, 1, n))
    view.copy_(values)
    return view


def paged_stacks(copies: int, k: int, outs: list[int], device: str):
    """`copies` sets of the engine's paged slot memory holding 32 rank-16 adapters at pages 0, 2, 4, ...: (A as its
    (pages, G, r_max, in) view, [B_g as (pages, out_g, r_max) views])."""
    g, used = len(outs), NUM_ADAPTERS * PAGED.pages_for(16) * PAGED.page_rank  # rows the adapters hold
    sets = []
    for _ in range(copies):
        a = torch.zeros(g * PAGED.rows, k, device=device, dtype=DTYPE)
        for i in range(g):
            a[i * PAGED.rows : i * PAGED.rows + used] = torch.randn(used, k, device=device, dtype=DTYPE) / k**0.5
        bs = []
        for n in outs:
            b = torch.zeros(PAGED.rows, n, device=device, dtype=DTYPE)
            b[:used] = torch.randn(used, n, device=device, dtype=DTYPE)
            bs.append(_b_views(b, PAGED))
        sets.append((_page_views(a, PAGED, g), bs))
    return sets


def slot_ranks(mix: str, ranks: list[int], groups: int, device: str) -> torch.Tensor:
    """The kernels' ranks argument: per slot, or for `paged` per page and group (0 where no adapter starts)."""
    if mix != "paged":
        return torch.tensor(ranks, device=device, dtype=torch.int32)
    per_page = torch.zeros(PAGED.pages, groups, device=device, dtype=torch.int32)
    per_page[: NUM_ADAPTERS * PAGED.pages_for(16) : PAGED.pages_for(16)] = 16
    return per_page


def make_stacks(copies: int, k: int, outs: list[int], r_max: int, ranks: list[int], device: str, layout: str):
    """`copies` sets of (A (S, G·r_max, in), [B_g (S, out_g, r_max)]), zero past each slot's rank."""
    g = len(outs)
    valid = torch.arange(r_max, device=device)[None, :] < torch.tensor(ranks, device=device)[:, None]  # (S, r_max)
    sets = []
    for _ in range(copies):
        a = torch.randn(NUM_ADAPTERS, g * r_max, k, device=device, dtype=DTYPE) / k**0.5
        a *= valid.repeat(1, g)[:, :, None]
        bs = [
            b_stack(torch.randn(NUM_ADAPTERS, n, r_max, device=device, dtype=DTYPE) * valid[:, None, :], layout)
            for n in outs
        ]
        sets.append((a, bs))
    return sets


def min_bytes(tokens: int, k: int, outs: list[int], ranks: list[int], slots: torch.Tensor) -> int:
    used = sorted(set(slots.tolist()))
    rank_sum = sum(ranks[s] for s in used)
    elem = torch.finfo(DTYPE).bits // 8
    weights = rank_sum * len(outs) * k * elem + rank_sum * sum(outs) * elem
    return tokens * k * elem + weights + 2 * tokens * sum(outs) * elem


def time_graph(call: Callable[[int], None], copies: int, calls: int = 24, replays: int = 15) -> float:
    """Median microseconds per call over replays of a CUDA graph of `calls` calls (call i: weight copy i % copies)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(copies, 3)):
            call(i)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % copies)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return statistics.median(times)


def torch_reference(ys, x, a, bs, slots, scalings, r_max, valid) -> None:
    """Gather each token's A and B, then bmm: the plain-torch way, (T, r, in) and (T, out, r) gathered per call.
    valid (S, G·r_max): the rows of A within each slot's rank (past it, paged memory holds the next slot's)."""
    idx = slots.clamp(min=0).long()
    h = torch.bmm(a[idx].flatten(1, -2), x.unsqueeze(-1)) * valid[idx].unsqueeze(-1)  # (T, G·r_max, 1)
    scale = (scalings[idx] * (slots >= 0)).to(x.dtype)[:, None]  # (T, 1)
    for g, (y, b) in enumerate(zip(ys, bs, strict=True)):
        delta = torch.bmm(b[idx], h[:, g * r_max : (g + 1) * r_max].to(b.dtype)).squeeze(-1)  # (T, out)
        y.add_(delta * scale)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def rank_valid(rank_t: torch.Tensor, groups: int, r_max: int) -> torch.Tensor:
    """(S, G·r_max): True where a row of A lies within its slot's rank."""
    per_group = rank_t.view(rank_t.shape[0], -1).expand(-1, groups)  # (S, G)
    return (torch.arange(r_max, device=rank_t.device) < per_group[:, :, None]).flatten(1).to(DTYPE)


def group_ranks(rank_t: torch.Tensor, g: int) -> torch.Tensor:
    return rank_t[:, g] if rank_t.dim() == 2 else rank_t


def group_a(a: torch.Tensor, g: int, r_max: int) -> torch.Tensor:
    return a[:, g] if a.dim() == 4 else a[:, g * r_max : (g + 1) * r_max]


def weight_sets(copies: int, k: int, outs: list[int], mix: str, device: str, layout: str):
    r_max, ranks = adapter_ranks(mix)
    if mix == "paged":
        return paged_stacks(copies, k, outs, device)
    return make_stacks(copies, k, outs, r_max, ranks, device, layout)


def bench_case(
    case: str, module: str, k: int, outs: list[int], batch: str, mix: str, fused: bool, layout: str
) -> list[Row]:
    device = "cuda"
    tokens = BATCHES[batch]
    r_max, ranks = adapter_ranks(mix)
    elem = torch.finfo(DTYPE).bits // 8
    set_bytes = NUM_ADAPTERS * r_max * (len(outs) * k + sum(outs)) * elem
    copies = max(1, min(16, -(-L2_FLUSH_BYTES // set_bytes)))
    groups = len(outs)
    sets = weight_sets(copies, k, outs, mix, device, layout)
    slots = token_slots(batch, tokens, device, mix)
    rank_t = slot_ranks(mix, ranks, groups, device)
    valid = rank_valid(rank_t, groups, r_max)
    scalings = torch.rand(num_slots(mix), device=device) + 0.5
    x = torch.randn(tokens, k, device=device, dtype=DTYPE)
    ys = [torch.zeros(tokens, n, device=device, dtype=DTYPE) for n in outs]
    segments = lk.plan_segments(slots, num_slots(mix))
    nbytes = min_bytes(tokens, k, outs, ranks, adapters_of(slots, mix))

    def run_ref(i: int) -> None:
        a, bs = sets[i]
        torch_reference(ys, x, a, bs, slots, scalings, r_max, valid)

    def run_kernels(path: str) -> Callable[[int], None]:
        def call(i: int) -> None:
            a, bs = sets[i]
            seg = segments if path == "segment" else None
            if fused:
                h = lk.shrink(x, a, slots, ranks=rank_t, groups=groups, segments=seg, path=path)
                lk.expand_fused(ys, h, bs, slots, scalings, ranks=rank_t, segments=seg, path=path)
                return
            for g, (y, b) in enumerate(zip(ys, bs, strict=True)):
                rank_g = group_ranks(rank_t, g)
                h = lk.shrink(x, group_a(a, g, r_max), slots, ranks=rank_g, segments=seg, path=path)
                lk.expand(y, h, b, slots, scalings, ranks=rank_g, segments=seg, path=path)

        return call

    # Correctness on this very workload before timing it.
    for y in ys:
        y.zero_()
    run_ref(0)
    want = [y.clone() for y in ys]
    impls: dict[str, Callable[[int], None]] = {}
    if not fused:
        impls["torch gather+bmm"] = run_ref
    label = "fused" if fused else "kernels"
    impls[f"{label} gather"] = run_kernels("gather")
    impls[f"{label} segment"] = run_kernels("segment")
    rows = []
    for name, call in impls.items():
        err = None
        if call is not run_ref:
            for y in ys:
                y.zero_()
            call(0)
            err = max(rel_err(y, w) for y, w in zip(ys, want, strict=True))
        us = time_graph(call, copies)
        rows.append(Row(case, module, batch, mix, name, us, nbytes / us / 1e3, err))
    return rows


def bench_separate(case: str, module: str, k: int, outs: list[int], batch: str, mix: str, layout: str) -> list[Row]:
    """The same fused modules as separate per-module calls (each through the path `auto` picks)."""
    device = "cuda"
    tokens = BATCHES[batch]
    r_max, ranks = adapter_ranks(mix)
    elem = torch.finfo(DTYPE).bits // 8
    set_bytes = NUM_ADAPTERS * r_max * (len(outs) * k + sum(outs)) * elem
    copies = max(1, min(16, -(-L2_FLUSH_BYTES // set_bytes)))
    sets = weight_sets(copies, k, outs, mix, device, layout)
    slots = token_slots(batch, tokens, device, mix)
    rank_t = slot_ranks(mix, ranks, len(outs), device)
    scalings = torch.rand(num_slots(mix), device=device) + 0.5
    x = torch.randn(tokens, k, device=device, dtype=DTYPE)
    ys = [torch.zeros(tokens, n, device=device, dtype=DTYPE) for n in outs]
    segments = lk.plan_segments(slots, num_slots(mix)) if tokens > lk.GATHER_MAX_TOKENS else None
    # each module's own A (paged memory: its view, as the engine's modules have)
    a_parts = [[group_a(a, g, r_max) if a.dim() == 4 else group_a(a, g, r_max).contiguous() for g in range(len(outs))]
               for a, _ in sets]  # fmt: skip

    def call(i: int) -> None:
        for g, (a_g, y, b) in enumerate(zip(a_parts[i], ys, sets[i][1], strict=True)):
            h = lk.shrink(x, a_g, slots, ranks=group_ranks(rank_t, g), segments=segments)
            lk.expand(y, h, b, slots, scalings, ranks=group_ranks(rank_t, g), segments=segments)

    us = time_graph(call, copies)
    return [
        Row(
            case,
            module,
            batch,
            mix,
            "separate auto",
            us,
            min_bytes(tokens, k, outs, ranks, adapters_of(slots, mix)) / us / 1e3,
        )
    ]


def bench_plan(batch: str, mix: str) -> Row:
    tokens = BATCHES[batch]
    slots = token_slots(batch, tokens, "cuda", mix)
    us = time_graph(lambda i: lk.plan_segments(slots, num_slots(mix)), 1)
    return Row("plan", "-", batch, mix, "plan_segments", us, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument(
        "--json", type=Path, help="write every figure here (default: a new dated file in loadtests/results/)"
    )
    parser.add_argument("--batches", nargs="*", default=list(BATCHES), choices=list(BATCHES))
    parser.add_argument("--mixes", nargs="*", default=["r16", "mixed"], choices=MIXES, help="adapter mixes")
    parser.add_argument(
        "--b-layout", default="rank-major", choices=B_LAYOUTS, help="how B is stored (default: as the engine does)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_kernels: error: needs a CUDA device", file=sys.stderr)
        return 1
    args.json = args.json or dated_json_path("lora-kernels")
    torch.manual_seed(0)
    rows: list[Row] = []
    for batch in args.batches:
        for mix in args.mixes:
            rows.append(bench_plan(batch, mix))
            for module, (k, n) in MODULES.items():
                rows += bench_case("single", module, k, [n], batch, mix, fused=False, layout=args.b_layout)
            for module, (k, outs) in {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336])}.items():
                rows += bench_case("fused", module, k, outs, batch, mix, fused=True, layout=args.b_layout)
                rows += bench_separate("fused", module, k, outs, batch, mix, args.b_layout)
            torch.cuda.empty_cache()
    print(f"{'module':10} {'batch':13} {'adapters':8} {'impl':17} {'us':>9} {'GB/s':>7} {'rel err':>8}")
    for r in rows:
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
        print(f"{r.module:10} {r.batch:13} {r.adapters:8} {r.impl:17} {r.us:9.1f} {r.gbps:7.0f} {err:>8}")
    if args.json:
        meta = {
            "command": "python " + " ".join(sys.argv),
            "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
            "gather_max_tokens": lk.GATHER_MAX_TOKENS,
            "b_layout": args.b_layout,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
        print(f"wrote {args.json}")
    bad = [r for r in rows if r.rel_err is not None and not r.rel_err < 2e-2]
    for r in bad:
        print(f"MISMATCH {r.module} {r.batch} {r.adapters} {r.impl}: relative error {r.rel_err}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
