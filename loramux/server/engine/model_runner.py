"""Runs one step of the model: builds the flat batch (tokens, positions, KV cache indices, adapter slot per token)
from the scheduled chunks, runs the forward pass, and returns the logits rows that will be sampled."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from loramux.adapters.weights import LoraWeights
from loramux.server.layers.attention import BatchContext
from loramux.server.models.llama import LlamaForCausalLM


@dataclass
class Chunk:
    """A piece of one sequence computed in a step."""

    token_ids: list[int]  # the tokens computed now
    start: int  # position of the first of them (= tokens already in the KV cache)
    block_table: list[int]  # blocks covering positions 0 .. start + len(token_ids) - 1
    slot: int = -1  # adapter slot, -1 = base model only
    all_logits: bool = False  # logits for every token of the chunk, not just the last


class ModelRunner:
    """Owns the KV cache; the model's adapter slots (if any) are allocated before, by the engine."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, num_blocks: int) -> None:
        self.model = model
        self.block_size = block_size
        self.device = model.lm_head_weight.device
        self.lora_modules = model.lora_modules()
        model.allocate_kv_cache(num_blocks, block_size)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """One forward pass over all chunks -> per chunk its logits, (1, vocab) or (n, vocab) with all_logits."""
        ids, positions, kv_index, slots, ranges, contexts = [], [], [], [], [], []
        bs = self.block_size
        for chunk in chunks:
            n, end = len(chunk.token_ids), chunk.start + len(chunk.token_ids)
            table = torch.tensor(chunk.block_table, dtype=torch.long)
            # flat cache index of every position 0..end-1 of the sequence: (end,)
            index = (table[:, None] * bs + torch.arange(bs)).flatten()[:end]
            ranges.append((len(ids), len(ids) + n))
            contexts.append(index.to(self.device))
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, end))
            kv_index.append(index[chunk.start :])
            slots.extend([chunk.slot] * n)
        token_slots = None
        if any(s >= 0 for s in slots):
            token_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        ctx = BatchContext(
            kv_index=torch.cat(kv_index).to(self.device),
            token_slots=token_slots,
            query_ranges=ranges,
            context_index=contexts,
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            ctx,
        )
        # only the rows that are sampled go through the (large) output head
        rows = [
            torch.arange(start, end) if chunk.all_logits else torch.tensor([end - 1])
            for chunk, (start, end) in zip(chunks, ranges, strict=True)
        ]
        logits = self.model.compute_logits(hidden[torch.cat(rows).to(self.device)])
        return list(logits.split([len(r) for r in rows]))

    @torch.inference_mode()
    def write_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Load an adapter into `slot` of every decoder linear layer (zeros where it has no module).

        Called on the adapter loader thread while steps run: the slot is not in use by any request, and on the GPU
        the copies go on a stream of their own so they overlap the step's kernels.
        """
        with contextlib.ExitStack() as stack:
            stream = None
            if self.device.type == "cuda":
                stream = torch.cuda.Stream(self.device)
                stack.enter_context(torch.cuda.stream(stream))
            for name, module in self.lora_modules.items():
                lora = weights.modules.get(name) if weights is not None else None
                if lora is None:
                    module.write_slot(slot, None, None, 0.0)
                else:
                    module.write_slot(slot, lora.a, lora.b, lora.scaling)
            if stream is not None:
                stream.synchronize()  # the slot is marked ready only once its weights are in place
