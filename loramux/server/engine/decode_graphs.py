"""Decode steps (one new token per sequence) as CUDA graphs: the batch is padded up to the next captured size, its
inputs copied into static tensors (token ids, positions, cache indices, adapter slots, block tables, context
lengths), and one replay runs every kernel of the step with no host synchronisation. One graph per (batch size, with
or without LoRA): the decode attention kernel reads each sequence's blocks in place through a block table as wide as
the longest context, so the graphs do not depend on the sequences' lengths. Padding rows compute on a scratch KV
block that no sequence owns. Graphs are captured ahead of serving (`capture_all`) or on first use."""

from __future__ import annotations

import torch

from loramux.server.engine.batch import Chunk, block_table_rows
from loramux.server.layers.attention import BatchContext
from loramux.server.models.llama import LlamaForCausalLM
from loramux.server.transfer import to_device

# Batch sizes that decode graphs are captured for; a batch is padded up to the next one.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    """CUDA graphs of decode steps, captured on first use and replayed with the step's inputs copied in."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, scratch_block: int) -> None:
        self.model = model
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_batch = GRAPH_BATCH_SIZES[-1]
        self.max_width = -(-model.config.max_position_embeddings // block_size)
        device = model.lm_head_weight.device
        # Static inputs, rows of (5, max_batch): token ids, positions, flat KV index, adapter slot, context length.
        self.vectors = torch.zeros(5, self.max_batch, dtype=torch.long, device=device)
        self.tables = torch.full((self.max_batch, self.max_width), scratch_block, dtype=torch.long, device=device)
        # (batch size, with LoRA) -> the graph and its output logits
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def fits(self, chunks: list[Chunk]) -> bool:
        """Whether a graph computes this step: decode tokens only (no chunk asking for more logits), few enough."""
        if not chunks or len(chunks) > self.max_batch:
            return False
        return all(len(c.token_ids) == 1 and not c.all_logits for c in chunks)

    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Replay the graph of the step's padded size -> per chunk its (1, vocab) logits."""
        n = len(chunks)
        size = next(s for s in GRAPH_BATCH_SIZES if s >= n)
        bs = self.block_size
        vectors = torch.zeros(5, size, dtype=torch.long)
        vectors[2].fill_(self.scratch_block * bs)
        vectors[3].fill_(-1)
        vectors[4].fill_(1)  # a padding row attends to the one scratch position it wrote
        vectors[:, :n] = torch.tensor(
            [
                [c.token_ids[0] for c in chunks],
                [c.start for c in chunks],
                [c.block_table[c.start // bs] * bs + c.start % bs for c in chunks],
                [c.slot for c in chunks],
                [c.start + 1 for c in chunks],
            ]
        )
        # only the columns some sequence uses are copied: a row's later entries are never read (its context length
        # ends before them)
        used_width = min(self.max_width, max((c.start // bs) + 1 for c in chunks))
        tables = block_table_rows([c.block_table for c in chunks], used_width, self.scratch_block, rows=size)
        lora = self.model.num_lora_pages > 0 and any(c.slot >= 0 for c in chunks)
        vectors, tables = to_device([vectors, tables], self.vectors.device)  # without waiting for the device
        self.vectors[:, :size].copy_(vectors)
        self.tables[:size, :used_width].copy_(tables)
        key = (size, lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, logits = self.graphs[key]
        graph.replay()
        # a copy: the next replay overwrites the graph's output
        return list(logits[:n].clone().split(1))

    def capture_all(self) -> None:
        """Capture the graph of every batch size ahead of use, with and without adapters (inputs: padding rows)."""
        self.vectors.zero_()
        self.vectors[2].fill_(self.scratch_block * self.block_size)
        self.vectors[3].fill_(-1)
        self.vectors[4].fill_(1)
        self.tables.fill_(self.scratch_block)
        for lora in (False, True) if self.model.num_lora_pages else (False,):
            for size in GRAPH_BATCH_SIZES:
                if (size, lora) not in self.graphs:
                    self.graphs[(size, lora)] = self._capture(size, lora)

    def _forward(self, size: int, lora: bool) -> torch.Tensor:
        v = self.vectors
        ctx = BatchContext(
            kv_index=v[2, :size],
            token_slots=v[3, :size] if lora else None,
            query_ranges=[],
            context_index=[],
            block_tables=self.tables[:size],
            context_lens=v[4, :size],
        )
        hidden = self.model(v[0, :size], v[1, :size], ctx)
        return self.model.compute_logits(hidden)  # (size, vocab) fp32

    def _capture(self, size: int, lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels); it computes the same step the
        # replay will, so the K/V it writes are the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size, lora)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: only this thread's calls are checked and captured; a capture on first use happens while
        # serving, with other threads of the process (the adapter fetch threads) at work
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._forward(size, lora)
        return graph, logits
