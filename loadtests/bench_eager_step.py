"""Wall time of one engine step by its make-up (prompts of 128 tokens, decode tokens through a graph on a GPU), on the
Llama-3-8B shape with 64 adapter slots loaded and nothing else running, and the host time until the step had queued
all its work, as the engine runs it (on a GPU the prompts' pass through piecewise graphs where its token count has
them); then a cProfile of one mixed step, to show where its host time goes.

    python loadtests/bench_eager_step.py [--tiny]

The figures of prompt passes launched kernel by kernel on a GPU (the engine before its prompt graphs) come from
this script at a commit of that time: the engine no longer has a switch for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_engine import TINY, build_base, write_adapter
from loadtests.profiling import top_functions
from loadtests.record import help_text
from loadtests.shapes import LLAMA3_8B
from loramux.server.engine.batch import Chunk
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.model_runner import ModelRunner
from loramux.server.models.lora_weights import load_lora

SHAPES = ((0, 128), (1, 0), (3, 0), (3, 100), (16, 100), (64, 0), (64, 100))  # (prompts, decode tokens)
SLOTS, BLOCK = 64, 16


def chunks(prompts: int, decodes: int, prompt_len: int) -> list[Chunk]:
    """Prompts from position 0 and decode tokens at position 200, on distinct KV blocks (contents do not matter)."""
    out, block = [], 0
    for i in range(prompts + decodes):
        prompt = i < prompts
        n_blocks = -(-prompt_len // BLOCK) if prompt else 13
        table = list(range(block, block + n_blocks))
        block += n_blocks
        out.append(Chunk([1] * prompt_len, 0, table, i % SLOTS) if prompt else Chunk([1], 200, table, i % SLOTS))
    return out


def wall(runner: ModelRunner, batch: list[Chunk], device: torch.device, reps: int = 3) -> tuple[float, float]:
    """The fastest of `reps` runs of the step, its first logits row read back (as sampling does): (wall seconds,
    host seconds until `run` returned, i.e. until every kernel of the step was queued)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        logits = runner.run(batch)
        queued = time.perf_counter() - started
        logits[0].float().sum().item()
        times.append((time.perf_counter() - started, queued))
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test, any device)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/loramux-bench-eager-step"), help="where adapters go")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = build_base(TINY if args.tiny else LLAMA3_8B, device)
    prompt_len = 8 if args.tiny else 128
    ranks = (8, 16, 32, 64)
    adapters = {}
    for rank in ranks:
        path = write_adapter(args.root / f"r{rank}", rank, ["q_proj", "v_proj"], base.config, seed=rank)
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        (path / "adapter_config.json").write_text(json.dumps(config))
        adapters[rank] = path
    blocks = max(p * -(-prompt_len // BLOCK) + d * 13 for p, d in SHAPES) + 64
    config = EngineConfig(num_slots=SLOTS, max_lora_rank=64, num_kv_blocks=blocks, max_num_seqs=256,
                          max_num_batched_tokens=8192)  # fmt: skip
    engine = LLMEngine(base, None, config)
    runner = engine.runner
    begun = time.perf_counter()
    runner.warm_up()
    captured = len(runner.prompt_graphs.pieces) if runner.prompt_graphs is not None else 0
    print(f"warm-up (kernels compiled, graphs captured; {captured} prompt token counts): "
          f"{time.perf_counter() - begun:.1f} s", flush=True)  # fmt: skip
    writer = engine.writer
    for slot in range(SLOTS):
        weights = load_lora(adapters[ranks[slot % 4]], base.config, writer.dtype, b_rank_major=writer.b_rank_major)
        writer.write(slot, weights)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the copies done before the steps are timed
    for prompts, decodes in SHAPES:
        seconds, queued = wall(runner, chunks(prompts, decodes, prompt_len), device)
        print(f"prompts {prompts:3} x {prompt_len} + decode {decodes:3}: {1e3 * seconds:8.1f} ms "
              f"(queued in {1e3 * queued:.1f} ms)", flush=True)  # fmt: skip
    batch = chunks(3, 100, prompt_len)
    print("profile of a mixed step:")
    print(top_functions(lambda: wall(runner, batch, device, reps=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
