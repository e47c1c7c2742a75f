"""On the GPU: decode steps replayed as CUDA graphs give the tokens that the eager step gives, with adapters mixed
in a batch, batches padded up to a captured size, and sequences crossing KV blocks."""

from __future__ import annotations

import pytest
import torch

from loadtests.bench_engine import LocalSource, write_adapter
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.models.loader import load_base

pytestmark = pytest.mark.gpu


def test_graph_decode_matches_eager_decode_with_mixed_adapters(tiny_checkpoint, tmp_path):
    base = load_base(str(tiny_checkpoint("llama")), device="cuda")
    source = LocalSource()
    for i, rank in enumerate((4, 8, 16)):
        source.add(f"t/a{i}", write_adapter(tmp_path / f"a{i}", rank, ["q_proj", "v_proj", "down_proj"],
                                            base.config, seed=i))  # fmt: skip
    prompts = [[5 + i, 17, 33 + 2 * i, 9] * (i + 1) for i in range(5)]  # 5 sequences: padded to a batch of 8
    adapters = ["t/a0", "t/a1", None, "t/a2", "t/a0"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # crosses 16-token blocks
    config = EngineConfig(num_slots=3, max_lora_rank=16, num_kv_blocks=64, block_size=16)
    outputs = {}
    for graphs in (False, True):
        engine = LLMEngine(base, source, config)
        if not graphs:
            engine.runner.graphs = None
        outputs[graphs] = [o.token_ids for o in engine.generate(prompts, params, adapters=adapters)]
        if graphs:
            assert engine.runner.graphs.graphs, "no decode step was replayed from a graph"
            assert {key[0] for key in engine.runner.graphs.graphs} <= {1, 2, 4, 8}
        engine.shutdown()
    assert outputs[True] == outputs[False]
    torch.cuda.synchronize()
