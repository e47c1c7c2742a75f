"""Host time of the engine's bookkeeping around a decode step: scheduling, building the chunks, sampling, appending
and streaming the tokens of every running request, with a forward that costs nothing (it returns fixed logits, as a
CUDA graph replay returns them: one row per chunk). On a GPU the device idles for this long every step, so it bounds
how much a faster forward can gain.

    python loadtests/bench_step_host.py [--requests 256] [--prompt 16] [--vocab 1024] [--steps 50] [--adapters 32]
        [--json PATH]

Runs on the CPU (the tiny random model, the benchmark's one-character-per-id tokenizer); prints the median host
milliseconds per decode step over a few repetitions and a profile of the functions that take the most time.
`--adapters N`: the requests round-robin over N rank-16 all-module adapters held in N slots (W1's make-up), so that
the bookkeeping adapters add shows beside a run without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_engine import TINY, LocalSource, build_base, prompts, write_adapter
from loadtests.profiling import top_functions
from loadtests.record import commit, help_text
from loramux.core.adapter_source import AdapterRef
from loramux.core.model_config import LINEAR_MODULES
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--requests", type=int, default=256, help="requests decoding in every step")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens of each request")
    parser.add_argument("--vocab", type=int, default=1024, help="logits per row (the argmax runs on the CPU here)")
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed per repetition")
    parser.add_argument("--adapters", type=int, default=0, help="rank-16 all-module adapters the requests use in turn")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    base = build_base(dict(TINY, vocab_size=args.vocab), torch.device("cpu"))
    n = args.requests
    blocks_each = -(-(args.prompt + 5 * args.steps + 16) // 16)
    config = EngineConfig(
        num_slots=args.adapters, max_lora_rank=16, num_kv_blocks=n * blocks_each + 8, max_num_seqs=n,
        max_num_batched_tokens=n * args.prompt,
    )  # fmt: skip
    source = LocalSource()
    names = [f"bench/a{i % args.adapters}" if args.adapters else None for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="bench-step-host-") as tmp:
        for i in range(args.adapters):
            source.add(f"bench/a{i}", write_adapter(Path(tmp) / f"a{i}", 16, list(LINEAR_MODULES), base.config, i))
        engine = LLMEngine(base, source if args.adapters else None, config)
        for i in range(args.adapters):  # read before the steps are timed
            engine.adapters.fetch(AdapterRef.parse(f"bench/a{i}"), None)
    return run(engine, args, names)


def run(engine: LLMEngine, args: argparse.Namespace, names: list[str | None]) -> int:
    n = args.requests
    table = torch.randn(n, args.vocab)
    engine.runner.run = lambda chunks: list(table[: len(chunks)].split(1))  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=5 * args.steps + 8, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts(n, args.prompt, args.vocab, seed=1)):
        engine.add(str(i), ids, params, adapter=names[i])
    engine.step()  # every prompt in one step
    runs = []
    for _ in range(4):
        began = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        runs.append((time.perf_counter() - began) / args.steps)
    report = top_functions(lambda: [engine.step() for _ in range(args.steps)])
    median = 1e3 * statistics.median(runs)
    print(f"{n} requests, {args.adapters} adapters: {median:.2f} ms of host time per decode step "
          f"(repetitions: {', '.join(f'{1e3 * r:.2f}' for r in runs)})")  # fmt: skip
    print(report)
    if args.json:
        figures = {"requests": n, "adapters": args.adapters, "ms_per_step_median": median,
                   "repetitions_ms": [1e3 * r for r in runs]}  # fmt: skip
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "commit": commit(), **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
