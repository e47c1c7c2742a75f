"""A forward pass over a step's chunks gives each sequence what it gets run alone: prompts' first chunks batched,
continued prompts and decode tokens beside them, with and without an adapter."""

from __future__ import annotations

import torch

from loadtests.bench_engine import write_adapter
from loramux.server.engine.batch import Chunk
from loramux.server.engine.model_runner import ModelRunner
from loramux.server.engine.slot_writer import SlotWriter
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.loader import load_base
from loramux.server.models.lora_weights import load_lora


def test_a_step_of_many_chunks_gives_each_sequence_what_it_gets_alone(tiny_checkpoint, tmp_path):
    base = load_base(str(tiny_checkpoint()), device="cpu")
    base.model.allocate_lora_slots(SlotLayout.of(num_slots=2, max_rank=8))
    runner = ModelRunner(base.model, block_size=4, num_blocks=32)
    writer = SlotWriter(base.model)
    path = write_adapter(tmp_path / "a", 8, ["q_proj", "v_proj", "down_proj"], base.config, seed=1, scale=0.3)
    assert writer.write(0, load_lora(path, base.config, writer.dtype, b_rank_major=writer.b_rank_major)) is None
    a, b, c = ([(k * j + 3) % 90 + 1 for j in range(n)] for k, n in ((7, 6), (5, 9), (3, 7)))
    prompts = [
        Chunk(a, 0, [0, 1], slot=0),  # the longest two: one padded causal call
        Chunk(b, 0, [4, 5, 6], all_logits=True),
        Chunk(c[:3], 0, [8], slot=0),  # too short to pad to the longest: attended on its own
    ]
    after = [
        Chunk([17], 6, [0, 1], slot=0),  # decode tokens, through the block tables
        Chunk(c[3:], 3, [8, 9], slot=0),  # the rest of c's prompt, over the context the first step stored
        Chunk([23], 9, [4, 5, 6]),
    ]
    for step in (prompts, after):
        alone = [runner.run([chunk])[0] for chunk in step]
        together = runner.run(step)
        rows = [len(chunk.token_ids) if chunk.all_logits else 1 for chunk in step]
        assert [t.shape[0] for t in together] == [t.shape[0] for t in alone] == rows
        for got, want in zip(together, alone, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the adapter is in play: without it, a's decode token gets other logits
    base_only = runner.run([Chunk([17], 6, [0, 1], slot=-1)])[0]
    assert not torch.allclose(base_only, runner.run([after[0]])[0], atol=1e-3)
