"""Runs one step of the model: builds the flat batch (tokens, positions, KV cache indices, adapter slot per token)
from the scheduled chunks (`batch.py`), runs the forward pass, and returns the logits rows that will be sampled.

On CUDA a step of decode tokens only (one new token per sequence) replays a CUDA graph (`decode_graphs.py`). Every
other step, a mixed one (prompt chunks beside decode tokens, the common step under steady load) included, is one pass
over all its tokens through piecewise graphs where its token count has them (`prompt_graphs.py`: everything but the
attention, padded to a captured count), else kernel by kernel. One pass because an NF4 layer dequantizes its whole
weight once per call at these sizes: a mixed step that replayed the decode graph and then ran its prompt chunks in a
pass of their own paid every layer's dequantization twice (8 ms a step for the 8B shape on an H200, a third of a
decode step). The pass uploads its inputs without waiting for the device (`loramux.server.transfer`), so no host
synchronisation happens before the step's logits are read.
"""

from __future__ import annotations

import torch

from loramux.server.engine.batch import Chunk, FlatBatch
from loramux.server.engine.decode_graphs import DecodeGraphs
from loramux.server.engine.prompt_graphs import PromptGraphs
from loramux.server.layers.attention import BatchContext, PrefillBatch
from loramux.server.models.llama import LlamaForCausalLM
from loramux.server.transfer import to_device

# On a GPU a pass's decode block tables are this many columns wide or a multiple of it: their width is the decode
# attention kernel's row stride, which Triton compiles a variant for by its divisibility, and a multiple of 16 (as
# the decode graphs' tables are for the usual context lengths) keeps every pass on one compiled variant.
GPU_TABLE_COLUMNS = 16


class ModelRunner:
    """Owns the KV cache; the model's adapter slots (if any) are allocated before, by the engine."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        num_blocks: int,
        cuda_graphs: bool = True,
        max_prompt_tokens: int = 0,
    ) -> None:
        """`max_prompt_tokens`: the most tokens a step computes; on a GPU with `cuda_graphs`, passes of prompt chunks
        up to that many tokens (and up to `prompt_graphs.PROMPT_GRAPH_TOKENS`) run through piecewise graphs."""
        self.model = model
        self.block_size = block_size
        self.device = model.lm_head_weight.device
        self.table_columns = GPU_TABLE_COLUMNS if self.device.type == "cuda" else 1
        # One block past those the block manager hands out: padding rows of a graph batch write their K/V there.
        model.allocate_kv_cache(num_blocks + 1, block_size)
        self.scratch_block = num_blocks
        self.graphs: DecodeGraphs | None = None
        self.prompt_graphs: PromptGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, block_size, scratch_block=num_blocks)
            if max_prompt_tokens > 0:
                self.prompt_graphs = PromptGraphs(model, num_blocks * block_size, max_prompt_tokens)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """The forward pass over all chunks -> per chunk its logits, (1, vocab) or (n, vocab) with all_logits."""
        if self.graphs is not None and self.graphs.fits(chunks):
            return self.graphs.run(chunks)
        return self.run_pass(chunks)

    def run_pass(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """One forward pass over all chunks, without the decode graphs (what `run` does where none fits) -> per
        chunk its logits: through the piecewise prompt graphs where they hold its token count (the attention eager
        between the pieces), else kernel by kernel."""
        flat = FlatBatch.of(chunks, self.block_size)
        graphs = self.prompt_graphs
        if graphs is not None and graphs.size_for(len(flat.ids)) is None:
            graphs = None
        lora = any(s >= 0 for s in flat.slots)
        # what goes to the device, in one copy that does not wait
        host = flat.decode_inputs(chunks, self.block_size, self.table_columns)
        if graphs is not None:  # ids, positions, cache indices and slots padded to a captured count, in one tensor
            host["inputs"] = graphs.pad(flat.ids, flat.positions, flat.kv_index, flat.slots)
        else:
            if lora:
                host["token_slots"] = torch.tensor(flat.slots, dtype=torch.long)
            host["ids"] = torch.tensor(flat.ids, dtype=torch.long)
            host["positions"] = torch.tensor(flat.positions, dtype=torch.long)
            host["kv_index"] = flat.kv_index
        # only the rows that are sampled go through the (large) output head
        host["rows"], counts = flat.sampled_rows(chunks)
        names = list(host)
        moved = to_device([*host.values(), *(flat.contexts[i] for i in flat.others)], self.device)
        dev = dict(zip(names, moved, strict=False))
        prefill = None
        if flat.fresh:
            ranges, contexts = [flat.ranges[i] for i in flat.fresh], [flat.contexts[i] for i in flat.fresh]
            prefill = PrefillBatch.build(ranges, contexts, self.device)
        ctx = BatchContext(
            kv_index=dev["inputs"][2] if graphs is not None else dev["kv_index"],
            token_slots=dev.get("token_slots"),
            query_ranges=[flat.ranges[i] for i in flat.others],
            context_index=moved[len(names) :],
            block_tables=dev.get("block_tables"),
            context_lens=dev.get("context_lens"),
            decode_rows=dev.get("decode_rows"),
            prefill=prefill,
        )
        if graphs is not None:
            hidden = graphs.run(dev["inputs"], lora, ctx)
        else:
            hidden = self.model(dev["ids"], dev["positions"], ctx)
        logits = self.model.compute_logits(hidden[dev["rows"]])
        return list(logits.split(counts))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """On the GPU, do now what a step would otherwise do the first time it meets a shape: compile each variant of
        the Triton kernels that passes of every size take (a compile costs a step up to a second), then
        capture the decode graph of every batch size and the prompt graphs of every token count (with and without
        adapters). The forwards compute on the scratch block only."""
        if self.device.type != "cuda":
            return
        slot = 0 if self.model.num_lora_pages else -1
        for tokens in (16, 128, 512):  # the LoRA kernels' gather path, then their segment path's two block sizes
            table = [self.scratch_block] * -(-tokens // self.block_size)
            # with a decode token beside the prompt, as in a mixed step: the decode attention's variant for them
            self.run_pass([Chunk([0] * tokens, 0, table, slot), Chunk([0], 0, [self.scratch_block], slot)])
        if self.graphs is not None:
            self.graphs.capture_all()
        if self.prompt_graphs is not None:
            self.prompt_graphs.capture_all((False, True) if self.model.num_lora_pages else (False,))
