"""Micro-benchmark of the NF4 matrix product: the fused Triton kernel against bitsandbytes' paths, on 8B shapes.

    python loadtests/bench_nf4.py --json nf4.json [--search]

For every linear layer shape of Llama-3-8B (q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336, down 14336->4096)
and row count (1 to 2048), it times `y = x·dequant(W)ᵀ` through: bitsandbytes' `matmul_4bit` (what `NF4Linear` runs
below `DIRECT_DEQUANT_MIN_ROWS`), bitsandbytes' dequantization kernel then a cuBLAS GEMM (what it runs from there),
and `nf4_kernels.nf4_matmul` with its default launch configuration; with `--search`, every configuration of a
candidate list too, so that `pick_config` can be checked against the best one found. A last table sums each path over
the 224 layers of a decode step (7 shapes x 32 layers) at each row count.

Each figure is the median over replays of a CUDA graph of many calls, each call reading another copy of the weight so
that weights come from memory and not from L2 (as in a model, where every layer has its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import bitsandbytes as bnb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_lora_kernels import time_graph
from loadtests.record import commit, dated_json_path, help_text
from loramux.server.layers import nf4_kernels as nk
from loramux.server.layers.nf4_linear import NF4Linear, _nf4_dequantize_kernel

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
LAYERS_PER_STEP = {"q_proj": 2, "k_proj": 2, "gate_proj": 2, "down_proj": 1}  # q+o, k+v, gate+up, down: per layer
ROWS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
L2_FLUSH_BYTES = 240 * 2**20  # weight copies rotate through 4x the H200's 60 MB of L2
DTYPE = torch.bfloat16


def candidates(m: int) -> list[nk.Config]:
    """Launch configurations tried with --search at m rows (split 0: `with_split` gives it)."""
    tall = min(256, max(16, 1 << (m - 1).bit_length()))
    found = []
    for block_m in sorted({tall, max(16, tall // 2)}):
        for block_n in (64, 128):
            for block_k in (64, 128):
                warps = 8 if block_m * block_n >= 128 * 64 else 4
                for tree, stages in ((True, 3), (False, 1), (False, 3)):
                    found.append(nk.Config(block_m, block_n, block_k, 0, warps, stages, tree, swap=True))
    return found


def with_split(cfg: nk.Config, m: int, n: int, k: int) -> nk.Config:
    """`cfg` with the split `pick_config`'s rule gives its tile (where cfg.split is 0)."""
    if cfg.split:
        return cfg
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    return dataclasses.replace(cfg, split=nk.split_for(tiles, k, cfg.block_k))


def time_calls(calls: list[Callable[[], object]], replays: int = 10) -> float:
    """Median microseconds per call over replays of one CUDA graph holding all the calls (each its own weight)."""
    return time_graph(lambda i: calls[i](), copies=len(calls), calls=len(calls), replays=replays)


def layers_for(n: int, k: int, device: torch.device) -> list[NF4Linear]:
    copies = max(2, -(-L2_FLUSH_BYTES // (n * k // 2)))
    weight = torch.randn(n, k, device=device, dtype=DTYPE) * 0.02
    return [NF4Linear(weight, None, DTYPE) for _ in range(copies)]


def bnb_call(x: torch.Tensor, layer: NF4Linear) -> Callable[[], object]:
    """bitsandbytes' `matmul_4bit` (its own choice of path)."""
    return lambda: bnb.matmul_4bit(x, layer.packed.t(), quant_state=layer.serving_state)


def direct_call(x: torch.Tensor, layer: NF4Linear, scratch: torch.Tensor, dequantize) -> Callable[[], object]:
    """bitsandbytes' dequantization kernel into `scratch`, then cuBLAS (NF4Linear's path from 65 rows)."""
    state = layer.serving_state
    pointers = (layer.packed.data_ptr(), state.absmax.data_ptr(), scratch.data_ptr())

    def call() -> object:
        dequantize(None, *pointers, state.blocksize, scratch.numel(), torch.cuda.current_stream().cuda_stream)
        return torch.nn.functional.linear(x, scratch)

    return call


def fused_call(x: torch.Tensor, layer: NF4Linear, cfg: nk.Config | None) -> Callable[[], object]:
    state = layer.serving_state
    n = layer.out_features
    return lambda: nk.nf4_matmul(x, layer.packed, state.absmax, state.code, n, config=cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument(
        "--json", type=Path, help="write every figure here (default: a new dated file in loadtests/results/)"
    )
    parser.add_argument("--rows", type=int, nargs="*", default=list(ROWS))
    parser.add_argument("--search", action="store_true", help="also time every candidate launch configuration")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    args.json = args.json or dated_json_path("nf4")
    device = torch.device("cuda")
    dequantize = _nf4_dequantize_kernel(DTYPE)
    results: list[dict] = []
    for name, (n, k) in SHAPES.items():
        layers = layers_for(n, k, device)
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=DTYPE)
            scratch = torch.empty(n, k, device=device, dtype=DTYPE)

            row = {"module": name, "n": n, "k": k, "rows": m}
            row["bnb_us"] = time_calls([bnb_call(x, layer) for layer in layers])
            row["dequant_gemm_us"] = time_calls([direct_call(x, layer, scratch, dequantize) for layer in layers])
            picked = nk.pick_config(m, n, k, nk._multiprocessors(device))
            row["fused_us"] = time_calls([fused_call(x, layer, picked) for layer in layers])
            row["fused_config"] = str(picked)
            want = torch.nn.functional.linear(x.double(), layers[0].dequantize().double())
            got = nk.nf4_matmul(x, layers[0].packed, layers[0].serving_state.absmax, layers[0].serving_state.code, n)
            row["fused_rel_err"] = ((got.double() - want).norm() / want.norm()).item()
            if args.search:
                tried = {}
                for cand in candidates(m):
                    cfg = with_split(cand, m, n, k)
                    unsplit = dataclasses.replace(cfg, split=1)
                    for option in {cfg, unsplit}:
                        try:
                            calls = [fused_call(x, layer, option) for layer in layers]
                            tried[str(option)] = time_calls(calls, replays=5)
                        except Exception as exc:  # a configuration that does not fit (shared memory, registers)
                            tried[str(option)] = f"{type(exc).__name__}"
                timed = {key: us for key, us in tried.items() if isinstance(us, float)}
                best = min(timed, key=timed.get)
                row["search"] = tried
                row["best_config"], row["best_us"] = best, timed[best]
            results.append(row)
            best_text = f"  best {row['best_us']:8.1f} {row['best_config']}" if args.search else ""
            print(f"{name:10} m={m:5}  bnb {row['bnb_us']:8.1f}  dequant+gemm {row['dequant_gemm_us']:8.1f}  "
                  f"fused {row['fused_us']:8.1f} (err {row['fused_rel_err']:.1e}){best_text}", flush=True)  # fmt: skip
        del layers
        torch.cuda.empty_cache()
    print("\nsum over a decode step's 224 layers (ms): rows, bnb, dequant+gemm, fused" +
          (", best found" if args.search else ""))  # fmt: skip
    for m in args.rows:
        rows = [r for r in results if r["rows"] == m]
        keys = ("bnb_us", "dequant_gemm_us", "fused_us", *(["best_us"] if args.search else []))
        total = {key: sum(r[key] * LAYERS_PER_STEP[r["module"]] * 32 for r in rows) / 1000 for key in keys}
        print(f"  {m:5}  " + "  ".join(f"{v:7.2f}" for v in total.values()))
    if args.json:
        meta = {
            "command": "python " + " ".join(sys.argv),
            "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
