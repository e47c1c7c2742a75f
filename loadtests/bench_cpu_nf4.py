"""Greedy decoding of the default SmolLM2 in NF4 on the CPU through the engine: one prompt, then eight, 16 tokens
each (EOS ignored). Run it with LORAMUX_CPU_DEQUANT_CACHE=0 and =1 to compare bitsandbytes' per-call dequantization
with the layer's cached dequantized weights.

    LORAMUX_CPU_DEQUANT_CACHE=0 python loadtests/bench_cpu_nf4.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.record import help_text


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=help_text(__doc__)).parse_args(argv)
    import torch

    from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
    from loramux.server.engine.request import SamplingParams
    from loramux.server.models.loader import load_base

    base = load_base(None, device="cpu")
    engine = LLMEngine(base, None, EngineConfig(num_slots=0))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = "What is the capital of France?"
    cache = os.environ.get("LORAMUX_CPU_DEQUANT_CACHE", "1")
    for n in (1, 8):
        started = time.perf_counter()
        engine.generate([prompt] * n, params)
        elapsed = time.perf_counter() - started
        print(f"cache={cache} threads={torch.get_num_threads()} {n} x 16 tokens: {elapsed:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
