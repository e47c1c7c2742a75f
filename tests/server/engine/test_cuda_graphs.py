"""On the GPU: decode steps replayed as CUDA graphs give the tokens that the eager step gives, with adapters mixed
in a batch, batches padded up to a captured size, and sequences crossing KV blocks."""

from __future__ import annotations

import pytest
import torch

from loadtests.bench_engine import LocalSource, write_adapter
from loramux.core.adapter_source import AdapterRef
from loramux.server.engine.batch import Chunk
from loramux.server.engine.decode_graphs import GRAPH_BATCH_SIZES
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.models.loader import load_base
from loramux.server.models.lora_weights import load_lora

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
        for name in ("t/a0", "t/a1", "t/a2"):  # read first: the runs batch alike whenever their reads would end
            engine.adapters.fetch(AdapterRef.parse(name), None)
        if not graphs:
            engine.runner.graphs = engine.runner.prompt_graphs = None
        outputs[graphs] = [o.token_ids for o in engine.generate(prompts, params, adapters=adapters)]
        if graphs:
            assert engine.runner.graphs.graphs, "no decode step was replayed from a graph"
            assert {key[0] for key in engine.runner.graphs.graphs} <= {1, 2, 4, 8}
        engine.shutdown()
    assert outputs[True] == outputs[False]
    torch.cuda.synchronize()


def test_mixed_steps_run_as_one_pass_and_decode_steps_replay_the_graph(tiny_checkpoint, tmp_path):
    """Short prompts decode while long ones are still prefilled in chunks: each of those mixed steps is one pass over
    its prompt chunks and decode tokens together (each NF4 weight dequantized once), the steps of decode tokens only
    replay a graph, and the tokens equal an all-eager run's."""
    base = load_base(str(tiny_checkpoint("llama")), device="cuda")
    source = LocalSource()
    for i, rank in enumerate((4, 8)):
        source.add(f"t/a{i}", write_adapter(tmp_path / f"a{i}", rank, ["q_proj", "v_proj"], base.config, seed=i))
    prompts = [[3 + i, 11, 7] for i in range(3)] + [[(5 * i + j) % 200 + 1 for j in range(40)] for i in range(2)]
    adapters = ["t/a0", None, "t/a1", "t/a1", "t/a0"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, block_size=16, max_num_batched_tokens=16)
    outputs, replays, mixed_passes = {}, [], []
    for graphs in (False, True):
        engine = LLMEngine(base, source, config)
        if graphs:
            engine.runner.warm_up()  # every batch size, ahead of use
            assert len(engine.runner.graphs.graphs) == 2 * len(GRAPH_BATCH_SIZES)
            replay, one_pass = engine.runner.graphs.run, engine.runner.run_pass

            def counted_replay(chunks, replay=replay):
                replays.append([len(c.token_ids) for c in chunks])
                return replay(chunks)

            def counted_pass(chunks, one_pass=one_pass):
                sizes = [len(c.token_ids) for c in chunks]
                if 1 in sizes and max(sizes) > 1:
                    mixed_passes.append(sizes)
                return one_pass(chunks)

            engine.runner.graphs.run, engine.runner.run_pass = counted_replay, counted_pass
        else:
            engine.runner.graphs = engine.runner.prompt_graphs = None
        outputs[graphs] = [o.token_ids for o in engine.generate(prompts, params, adapters=adapters)]
        engine.shutdown()
    assert outputs[True] == outputs[False]
    assert mixed_passes, "no step computed prompt chunks beside decode tokens"
    assert replays and all(set(sizes) == {1} for sizes in replays)  # the graphs took decode tokens only


def test_a_mixed_step_queues_all_its_work_without_waiting_for_the_device(tiny_checkpoint, tmp_path):
    """A mixed step's one pass waits for the device nowhere (its inputs go up asynchronously), so the host queues
    the whole step while the device computes. Prompts of 80 tokens take the NF4 layers' direct dequantize-and-multiply
    path."""
    base = load_base(str(tiny_checkpoint("llama")), device="cuda")
    adapter = write_adapter(tmp_path / "a", 8, ["q_proj", "v_proj", "down_proj"], base.config, seed=3)
    engine = LLMEngine(base, LocalSource(), EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    runner = engine.runner
    runner.warm_up()
    writer = engine.writer
    writer.write(0, load_lora(adapter, base.config, writer.dtype, b_rank_major=writer.b_rank_major)).synchronize()
    prompts = [Chunk([(7 * i + j) % 200 + 1 for j in range(80)], 0, list(range(5 * i, 5 * i + 5)), i - 1)
               for i in range(2)]  # fmt: skip
    decodes = [Chunk([11 + i], 20, [10 + 2 * i, 11 + 2 * i], i % 2 - 1) for i in range(3)]
    step = [prompts[0], decodes[0], decodes[1], prompts[1], decodes[2]]
    replays = []
    replay = runner.graphs.run

    def counted(chunks):
        replays.append(len(chunks))
        return replay(chunks)

    runner.graphs.run = counted
    first = [row.clone() for row in runner.run(step)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any call that waits for the device raises
    try:
        again = runner.run(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert replays == []  # one pass, no replay of the decode graph
    for got, want in zip(again, first, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    engine.shutdown()
