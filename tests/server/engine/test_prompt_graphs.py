"""Passes over prompt chunks cut at each layer's attention and padded to a captured token count (`PromptGraphs`)
compute what the plain pass computes: on the CPU the pieces run eagerly, on a GPU they are CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loadtests.bench_engine import write_adapter
from loramux.server.engine.batch import Chunk
from loramux.server.engine.model_runner import ModelRunner
from loramux.server.engine.prompt_graphs import PROMPT_GRAPH_TOKENS, PromptGraphs
from loramux.server.engine.slot_writer import SlotWriter
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.loader import load_base
from loramux.server.models.lora_weights import load_lora

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BLOCK = 4


def _runner(tiny_checkpoint, device: str, tmp_path: Path) -> ModelRunner:
    """A tiny model with two adapters in its slots: rank 8 on every module, rank 4 on q/v and the MLP's down_proj."""
    base = load_base(str(tiny_checkpoint()), device=device)
    base.model.allocate_lora_slots(SlotLayout.of(num_slots=2, max_rank=8))
    runner = ModelRunner(base.model, block_size=BLOCK, num_blocks=64, max_prompt_tokens=256)
    writer = SlotWriter(base.model)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for slot, (modules, rank) in enumerate(((every, 8), (["q_proj", "v_proj", "down_proj"], 4))):
        path = write_adapter(tmp_path / f"a{slot}", rank, modules, base.config, seed=slot + 1, scale=0.3)
        done = writer.write(slot, load_lora(path, base.config, writer.dtype, b_rank_major=writer.b_rank_major))
        if done is not None:
            done.synchronize()
    return runner


def _steps() -> list[list[Chunk]]:
    """Two steps over the same sequences: fresh prompts (with and without adapters, one asking for every row's
    logits), then a continued prompt chunk beside decode tokens."""
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(4)]  # 8 blocks of 4 positions each
    first = [
        Chunk([(7 * j + 3) % 90 + 1 for j in range(9)], 0, tables[0][:3], slot=0),
        Chunk([(5 * j + 1) % 90 + 1 for j in range(6)], 0, tables[1][:2], slot=-1, all_logits=True),
        Chunk([(3 * j + 2) % 90 + 1 for j in range(12)], 0, tables[2][:3], slot=1),
        Chunk([(11 * j + 4) % 90 + 1 for j in range(5)], 0, tables[3][:2], slot=0),
    ]
    second = [
        Chunk([17], 9, tables[0][:3], slot=0),  # decode
        Chunk([(2 * j + 9) % 90 + 1 for j in range(7)], 6, tables[1][:4], slot=-1),  # the prompt goes on
        Chunk([23], 12, tables[2][:4], slot=1),  # decode, into a new block
    ]
    return [first, second]


def _run_steps(runner: ModelRunner) -> list[list[torch.Tensor]]:
    return [[logits.float().cpu() for logits in runner.run_pass(chunks)] for chunks in _steps()]


@pytest.mark.parametrize("device", DEVICES)
def test_prompt_passes_through_pieces_match_the_plain_pass(tiny_checkpoint, device, tmp_path):
    runner = _runner(tiny_checkpoint, device, tmp_path)
    graphs, runner.prompt_graphs = runner.prompt_graphs, None  # the plain pass first
    plain = _run_steps(runner)
    if device == "cpu":  # no CUDA graphs: the same pieces, run eagerly
        graphs = PromptGraphs(runner.model, runner.scratch_block * BLOCK, 256, capture=False)
    runner.prompt_graphs = graphs
    assert runner.prompt_graphs is not None and runner.prompt_graphs.sizes == (64, 128, 192, 256)
    pieced = _run_steps(runner)
    assert set(runner.prompt_graphs.pieces) == {(64, True)}  # both steps padded to 64 tokens, with adapters
    layers = runner.model.config.num_hidden_layers
    assert len(runner.prompt_graphs.pieces[(64, True)].run) == layers + 1
    for want_step, got_step in zip(plain, pieced, strict=True):
        for want, got in zip(want_step, got_step, strict=True):
            assert got.shape == want.shape
            if device == "cpu":  # fp32, the same kernels
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
                continue
            # bf16 on a GPU, where cuBLAS may take other kernels for the padded count (each rounds differently): a
            # logit may move by a few percent of the logits' scale (0.082 of 2.25 on an H200), the mean far less; a
            # pass that reads the wrong K/V or adapter moves them all by the scale itself
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=0, atol=0.06 * scale)
            assert float((got - want).abs().mean()) <= 0.01 * scale
    # step two attends over the K/V that step one stored: padding written into a sequence's block would show there


def test_a_pass_is_padded_to_the_next_captured_count_and_too_many_tokens_run_plain(tiny_checkpoint, tmp_path):
    runner = _runner(tiny_checkpoint, "cpu", tmp_path)
    graphs = PromptGraphs(runner.model, runner.scratch_block * BLOCK, 1000, capture=False)
    assert graphs.sizes == tuple(s for s in PROMPT_GRAPH_TOKENS if s <= 1000) == tuple(range(64, 961, 64))
    assert [graphs.size_for(n) for n in (1, 64, 65, 257, 960, 961)] == [64, 64, 128, 320, 960, None]
    inputs = graphs.pad([5, 6, 7], [0, 1, 2], torch.tensor([40, 41, 42]), [1, 1, 1])
    assert inputs.shape == (4, 64)
    assert inputs[:, :3].tolist() == [[5, 6, 7], [0, 1, 2], [40, 41, 42], [1, 1, 1]]
    scratch = runner.scratch_block * BLOCK
    assert inputs[:, 3:].unique(dim=1).tolist() == [[0], [0], [scratch], [-1]]  # token 0 at the scratch block
    with pytest.raises(ValueError, match="more than the largest"):
        graphs.pad([1] * 961, list(range(961)), torch.arange(961), [-1] * 961)

    runner.prompt_graphs = graphs
    long_prompt = [Chunk([(j % 90) + 1 for j in range(200)], 0, list(range(50)), slot=0)]
    runner.prompt_graphs.sizes = (64, 128)  # 200 tokens are more than the largest: the plain pass
    runner.run_pass(long_prompt)
    assert not graphs.pieces
