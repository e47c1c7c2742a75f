"""Host time of the engine's bookkeeping around a decode step: scheduling, building the chunks, sampling, appending
and streaming the tokens of every running request, with a forward that costs nothing (it returns fixed logits, as a
CUDA graph replay returns them: one row per chunk). On a GPU the device idles for this long every step, so it bounds
how much a faster forward can gain.

    python loadtests/bench_step_host.py [--requests 256] [--prompt 16] [--vocab 1024] [--steps 50]

Runs on the CPU (the tiny random model, the benchmark's one-character-per-id tokenizer); prints the median host
milliseconds per decode step over a few repetitions and a profile of the functions that take the most time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_engine import TINY, build_base, prompts
from loadtests.profiling import top_functions
from loadtests.record import help_text
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--requests", type=int, default=256, help="requests decoding in every step")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens of each request")
    parser.add_argument("--vocab", type=int, default=1024, help="logits per row (the argmax runs on the CPU here)")
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed per repetition")
    args = parser.parse_args(argv)
    base = build_base(dict(TINY, vocab_size=args.vocab), torch.device("cpu"))
    n = args.requests
    blocks_each = -(-(args.prompt + 5 * args.steps + 16) // 16)
    config = EngineConfig(
        num_slots=0, num_kv_blocks=n * blocks_each + 8, max_num_seqs=n, max_num_batched_tokens=n * args.prompt
    )
    engine = LLMEngine(base, None, config)
    table = torch.randn(n, args.vocab)
    engine.runner.run = lambda chunks: list(table[: len(chunks)].split(1))  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=5 * args.steps + 8, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts(n, args.prompt, args.vocab, seed=1)):
        engine.add(str(i), ids, params)
    engine.step()  # every prompt in one step
    runs = []
    for _ in range(4):
        began = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        runs.append((time.perf_counter() - began) / args.steps)
    report = top_functions(lambda: [engine.step() for _ in range(args.steps)])
    print(f"{n} requests: {1e3 * statistics.median(runs):.2f} ms of host time per decode step "
          f"(repetitions: {', '.join(f'{1e3 * r:.2f}' for r in runs)})")  # fmt: skip
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
