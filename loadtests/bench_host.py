"""The engine's host work on the CPU: a tiny random Llama (so matrix work is small), many greedy requests, long
outputs. Prints generated tokens/s and a digest of every token id (two versions compared must produce the same).

    python loadtests/bench_host.py [--requests 64] [--prompt 16] [--tokens 512] [--src DIR]

`--src DIR` imports loramux from another checkout (e.g. a worktree of an older commit) for before/after runs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from loadtests.record import help_text  # from this checkout, whichever loramux is measured
    from loadtests.tiny_model import make_tiny_checkpoint

    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=512, help="generated tokens per request")
    parser.add_argument("--src", default=None, help="a checkout to import loramux from")
    args = parser.parse_args()

    if args.src:
        sys.path.insert(0, args.src)

    import torch

    from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
    from loramux.server.engine.request import SamplingParams
    from loramux.server.models.loader import load_base

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "tiny", "llama", max_position_embeddings=args.prompt + args.tokens + 64)
        base = load_base(str(path), device="cpu")
    blocks = args.requests * ((args.prompt + args.tokens) // 16 + 2)
    engine = LLMEngine(
        base,
        None,
        EngineConfig(num_slots=0, max_num_seqs=args.requests, num_kv_blocks=blocks, max_num_batched_tokens=4096),
    )
    prompts = [[5 + i % 200] * args.prompt for i in range(args.requests)]
    engine.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    started = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
    elapsed = time.perf_counter() - started
    tokens = sum(o.completion_tokens for o in outs)
    digest = hashlib.sha256(str([o.token_ids for o in outs]).encode()).hexdigest()[:16]
    print(f"{tokens} tokens in {elapsed:.2f}s: {tokens / elapsed:.0f} tokens/s; token digest {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
