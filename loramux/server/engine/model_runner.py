"""Runs one step of the model: builds the flat batch (tokens, positions, KV cache indices, adapter slot per token)
from the scheduled chunks, runs the forward pass, and returns the logits rows that will be sampled.

On CUDA a step of decode tokens only (one new token per sequence) replays a CUDA graph: the batch is padded up to
the next captured size, its inputs copied into static tensors (token ids, positions, cache slots, adapter slots,
block tables, context lengths), and one replay runs every kernel of the step with no host synchronisation. Graphs
are captured by `warm_up` before serving (or on first use), one per (batch size, with or without LoRA); with the
gather path of attention (the Triton decode kernel off) also per block-table width. Padding rows compute on a scratch
KV block that no sequence owns. A mixed step (prompt chunks beside decode tokens, the common step under
steady load) replays the decode graph for its decode tokens and runs the prompt chunks in a pass of their own, queued
behind the replay: that pass uploads its inputs without waiting for the device (`loramux.server.transfer`), so no host
synchronisation happens before the step's logits are read. Passes of prompt chunks (and other steps no decode graph
fits) replay piecewise graphs where their token count has them (`prompt_graphs.py`: everything but the attention,
padded to a captured count), else launch kernel by kernel.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loramux.adapters.weights import BRun, LoraWeights, b_runs, transpose_b_runs
from loramux.server.engine.prompt_graphs import PromptGraphs
from loramux.server.layers import attention
from loramux.server.layers.attention import BatchContext, PrefillBatch
from loramux.server.models.llama import LlamaForCausalLM
from loramux.server.transfer import to_device


@dataclass
class Chunk:
    """A piece of one sequence computed in a step."""

    token_ids: list[int]  # the tokens computed now
    start: int  # position of the first of them (= tokens already in the KV cache)
    block_table: list[int]  # blocks covering positions 0 .. start + len(token_ids) - 1
    slot: int = -1  # adapter slot, -1 = base model only
    all_logits: bool = False  # logits for every token of the chunk, not just the last


# Batch sizes that decode graphs are captured for; a batch is padded up to the next one.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# Without the in-place decode kernel, decode graphs gather each sequence's K/V padded to the widest block table:
# above this many gathered positions (batch x width) a step runs eagerly instead, so that the gather stays small.
GRAPH_MAX_GATHER = 256 * 512
# Slot-write plans kept (views of the slot memory and of the staging buffer, per slot and adapter layout): 0.11 MB of
# host memory each for q/v adapters of a 32-layer model, 0.39 MB for adapters on all seven modules (measured).
WRITE_PLANS_KEPT = 256


def block_table_rows(tables: list[list[int]], width: int, pad: int | None = None, rows: int = 0) -> torch.Tensor:
    """Block tables as a `(max(rows, len(tables)), width)` long tensor, each cut or padded to `width`: padded with
    `pad`, or with the table's own first block where `pad` is None; rows past the tables hold `pad` only. One tensor
    from one list (a `torch.tensor` per row cost ~4 ms of host time for 256 sequences on a 2-core VM)."""
    out = []
    for table in tables:
        row = table[:width]
        if len(row) < width:
            row = row + [row[0] if pad is None else pad] * (width - len(row))
        out.append(row)
    if rows > len(out):
        if pad is None:
            raise ValueError("padding rows need a pad block")
        out += [[pad] * width] * (rows - len(out))
    return torch.tensor(out, dtype=torch.long).reshape(len(out), width)


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
        self.lora_modules = model.lora_modules()
        # One block past those the block manager hands out: padding rows of a graph batch write their K/V there.
        model.allocate_kv_cache(num_blocks + 1, block_size)
        self.scratch_block = num_blocks
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, block_size, scratch_block=num_blocks)
        self.prompt_graphs: PromptGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and max_prompt_tokens > 0:
            self.prompt_graphs = PromptGraphs(model, num_blocks * block_size, max_prompt_tokens)
        self.graph_prompts = True  # passes of prompt chunks through `prompt_graphs` (where there are any)
        self.split_mixed = True  # mixed steps: decode tokens through a graph, prompt chunks through their own pass
        self._upload_stream: torch.cuda.Stream | None = None
        self._upload_lock = threading.Lock()
        self._slot_scalars: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # slot -> scaling, rank views
        # `_write_packed`'s staging buffer on the device, its copy plans per (slot, adapter layout), and the per-module
        # scaling and rank values it stages (with their views, made once)
        self._staging: torch.Tensor | None = None
        self._write_plans: OrderedDict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], list[BRun]]] = OrderedDict()
        self._scalar_staging: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]] | None = None

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """The forward pass over all chunks -> per chunk its logits, (1, vocab) or (n, vocab) with all_logits."""
        if self.graphs is None:
            return self.run_pass(chunks)
        if self.graphs.fits(chunks):
            return self.graphs.run(chunks)
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1 and not c.all_logits]
        if not self.split_mixed or not decode or len(decode) == len(chunks):
            return self.run_pass(chunks)
        # A mixed step: its decode tokens replay a graph, the prompt chunks run in their own pass beside them. Each
        # sequence attends only to its own cache, so the split computes the same step as one pass.
        graphed = [chunks[i] for i in decode]
        if not self.graphs.fits(graphed):
            return self.run_pass(chunks)
        graphed_at = set(decode)
        others = [i for i in range(len(chunks)) if i not in graphed_at]
        out: list[torch.Tensor | None] = [None] * len(chunks)
        # The graph first: while the device replays it, the host queues the prompt pass's kernels behind it (their
        # inputs go up without waiting for the device, `to_device`), so the prompt pass's host time hides the replay.
        for i, logits in zip(decode, self.graphs.run(graphed), strict=True):
            out[i] = logits
        for i, logits in zip(others, self.run_pass([chunks[i] for i in others]), strict=True):
            out[i] = logits
        return out  # type: ignore[return-value]

    def run_pass(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """One forward pass over all chunks, without the decode graphs (what `run` does where none fits, and for a
        mixed step's prompt chunks) -> per chunk its logits: through the piecewise prompt graphs where they are on
        and hold its token count (the attention eager between the pieces), else kernel by kernel."""
        ids, positions, kv_index, slots, ranges = [], [], [], [], []
        contexts: dict[int, torch.Tensor] = {}  # chunk -> flat cache index of its positions 0..end-1 (not decode)
        bs = self.block_size
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            ranges.append((len(ids), len(ids) + n))
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            slots.extend([chunk.slot] * n)
            if n == 1:  # a decode token: only its own cache slot; attention reads the block table
                position = chunk.start
                kv_index.append(torch.tensor([chunk.block_table[position // bs] * bs + position % bs]))
            else:
                table = torch.tensor(chunk.block_table, dtype=torch.long)
                contexts[i] = (table[:, None] * bs + torch.arange(bs)).flatten()[: chunk.start + n]
                kv_index.append(contexts[i][chunk.start :])
        # Attention by kind of chunk: decode tokens batched through the block tables, prompts' first chunks (all of
        # their context is in this step) in one padded batch, the rest (continued prompts) one sequence at a time.
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        fresh = [i for i, c in enumerate(chunks) if c.start == 0 and len(c.token_ids) > 1]
        longest = max((len(chunks[i].token_ids) for i in fresh), default=0)
        fresh = [i for i in fresh if 2 * len(chunks[i].token_ids) >= longest]  # padding at most doubles the work
        batched = set(decode) | set(fresh)
        others = [i for i in range(len(chunks)) if i not in batched]
        host: dict[str, torch.Tensor] = {}  # what goes to the device, in one copy that does not wait for it
        if decode:
            width = max(chunks[i].start // bs + 1 for i in decode)
            host["decode_rows"] = torch.tensor([ranges[i][0] for i in decode], dtype=torch.long)
            host["block_tables"] = block_table_rows([chunks[i].block_table for i in decode], width)
            host["context_lens"] = torch.tensor([chunks[i].start + 1 for i in decode], dtype=torch.long)
        lora = any(s >= 0 for s in slots)
        graphs = self.prompt_graphs if self.prompt_graphs is not None and self.graph_prompts else None
        if graphs is not None and graphs.size_for(len(ids)) is None:
            graphs = None
        if graphs is not None:  # ids, positions, cache indices and slots padded to a captured count, in one tensor
            host["inputs"] = graphs.pad(ids, positions, torch.cat(kv_index), slots)
        else:
            if lora:
                host["token_slots"] = torch.tensor(slots, dtype=torch.long)
            host["ids"] = torch.tensor(ids, dtype=torch.long)
            host["positions"] = torch.tensor(positions, dtype=torch.long)
            host["kv_index"] = torch.cat(kv_index)
        # only the rows that are sampled go through the (large) output head
        rows = [
            torch.arange(start, end) if chunk.all_logits else torch.tensor([end - 1])
            for chunk, (start, end) in zip(chunks, ranges, strict=True)
        ]
        host["rows"] = torch.cat(rows)
        names = list(host)
        moved = to_device([*host.values(), *(contexts[i] for i in others)], self.device)
        dev = dict(zip(names, moved, strict=False))
        prefill = None
        if fresh:
            prefill = PrefillBatch.build([ranges[i] for i in fresh], [contexts[i] for i in fresh], self.device)
        ctx = BatchContext(
            kv_index=dev["inputs"][2] if graphs is not None else dev["kv_index"],
            token_slots=dev.get("token_slots"),
            query_ranges=[ranges[i] for i in others],
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
        return list(logits.split([len(r) for r in rows]))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """On the GPU, do now what a step would otherwise do the first time it meets a shape: compile each variant of
        the Triton kernels that prompt chunks of every size take (a compile costs a step up to a second), then
        capture the decode graph of every batch size and the prompt graphs of every token count (with and without
        adapters). The forwards compute on the scratch block only."""
        if self.device.type != "cuda":
            return
        slot = 0 if self.model.num_lora_slots else -1
        for tokens in (16, 128, 512):  # the LoRA kernels' gather path, then their segment path's two block sizes
            table = [self.scratch_block] * -(-tokens // self.block_size)
            self.run_pass([Chunk([0] * tokens, 0, table, slot)])
        if self.graphs is not None:
            self.graphs.capture_all()
        if self.prompt_graphs is not None and self.graph_prompts:
            self.prompt_graphs.capture_all((False, True) if self.model.num_lora_slots else (False,))

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of the adapter slots (fp32 when the model has none)."""
        return next(iter(self.lora_modules.values())).compute_dtype if self.lora_modules else torch.float32

    @torch.inference_mode()
    def prepare_adapter(self, weights: LoraWeights) -> LoraWeights:
        """The adapter as the CPU cache keeps it: in the slots' dtype (bf16 on a GPU: half the bytes of fp32), in one
        buffer (pinned on a GPU, so that `write_slot` is asynchronous copies of whole blocks), with B laid out as
        `cache_b_rank_major` says."""
        if not self.lora_modules:
            return weights
        return weights.packed(
            self.adapter_dtype, pin_memory=self.device.type == "cuda", b_rank_major=self.cache_b_rank_major
        )

    def step_fence(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on this thread's stream (the step stream, when the step loop calls
        it), for `write_slot(..., after=)`; None on the CPU."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def write_slot(self, slot: int, weights: LoraWeights | None, after: torch.cuda.Event | None = None) -> None:
        """Load an adapter into `slot` of every decoder linear layer (rank 0 where it has no module), and return once
        the weights are in place: `issue_write`, then wait for its copies."""
        done = self.issue_write(slot, weights, after)
        if done is not None:
            done.synchronize()

    def issue_write(
        self, slot: int, weights: LoraWeights | None, after: torch.cuda.Event | None = None
    ) -> torch.cuda.Event | None:
        """Queue the load of an adapter into `slot` of every decoder linear layer (rank 0 where it has no module) and
        return an event the copies complete at, without waiting for them; None on the CPU, where they are done.

        The slot must be in use by no request. On the GPU the copies go on a stream of their own, so they overlap the
        step's kernels; that stream first waits for `after` (`step_fence`, taken when the slot was claimed: the steps
        queued until then may still read the slot's previous adapters; the ones queued since do not use the slot),
        or, without it, for all the work queued on the step stream. Waiting for everything made each write wait out
        the step in flight (and a queue of writes one step each) in W2. `weights` (its CPU buffer) must be kept until
        the event completes.
        """
        with self._upload_lock, contextlib.ExitStack() as stack:
            stream = None
            if self.device.type == "cuda":
                if self._upload_stream is None:
                    self._upload_stream = torch.cuda.Stream(self.device)
                stream = self._upload_stream
                if after is not None:
                    stream.wait_event(after)
                else:
                    stream.wait_stream(torch.cuda.default_stream(self.device))
                stack.enter_context(torch.cuda.stream(stream))
            if weights is not None and weights.buffer is not None:
                self._write_packed(slot, weights)
            else:
                for name, module in self.lora_modules.items():
                    lora = weights.modules.get(name) if weights is not None else None
                    if lora is None:
                        module.write_slot(slot, None, None, 0.0)
                    else:
                        module.write_slot(slot, lora.a, lora.b, lora.scaling)
            if stream is None:
                return None
            done = torch.cuda.Event()
            done.record(stream)
            return done

    def _write_packed(self, slot: int, weights: LoraWeights) -> None:
        """`write_slot` for an adapter in one buffer (as `load_lora` and `prepare_adapter` make it): the buffer goes
        to the device in one copy, into a staging buffer kept for it; where the buffer holds B as the file does
        (row-major), each projection's B of every layer is turned rank-major there (`transpose_b_runs`: two kernels
        a projection); then a few multi-tensor kernels scatter it into the slot and set every module's rank and
        scaling (instead of several copies and launches per module: an 8B model has 224).

        This runs on the loader thread beside the step loop, and every Python call it makes can keep the step loop
        waiting for the GIL. So the views it copies between are made once per (slot, adapter layout) and kept
        (`_write_plans`); a write is then a handful of calls whatever the number of modules (2.2-2.4 -> 1.2-1.4 ms
        a write on a 2-core CPU, BENCHMARKS.md, eighth day; the slow W2 step that led to it, with 39 writes queued,
        more likely met cuDNN's attention building a plan for a new shape: ninth day)."""
        buffer = weights.buffer
        assert buffer is not None
        # the buffer holds A and B module after module, in the adapter's order, with no gaps: its layout is the
        # modules' names and ranks, its dtype, and whether B is row-major (a rank-1 B reads the same either way)
        row_major = any(m.b.stride(0) != 1 for m in weights.modules.values())
        layout = (buffer.dtype, row_major, tuple((name, m.rank) for name, m in weights.modules.items()))
        if self._staging is None or self._staging.dtype != buffer.dtype or self._staging.numel() < buffer.numel():
            self._staging = torch.empty(buffer.numel(), dtype=buffer.dtype, device=self.device)
            self._write_plans.clear()  # their source views are of the staging buffer replaced here
        staged = self._staging[: buffer.numel()]
        staged.copy_(buffer, non_blocking=True)  # the buffer itself on the CPU
        plan = self._write_plans.pop((slot, layout), None)
        if plan is None:
            plan = self._write_plan(slot, weights, staged, row_major)
        self._write_plans[(slot, layout)] = plan  # the most recently used last
        while len(self._write_plans) > WRITE_PLANS_KEPT:
            self._write_plans.popitem(last=False)
        fills, sources, runs = plan
        transpose_b_runs(staged, runs)
        if fills:
            torch._foreach_copy_(fills, sources)
        scalars = self._slot_scalars.get(slot)
        if scalars is None:
            layers = self.lora_modules.values()
            scalars = self._slot_scalars[slot] = ([m.scalings[slot] for m in layers], [m.ranks[slot] for m in layers])
        if self._scalar_staging is None:
            count = len(self.lora_modules)
            values = torch.zeros(count, dtype=torch.float32, device=self.device)
            ranks = torch.zeros(count, dtype=torch.int32, device=self.device)
            self._scalar_staging = (values, list(values.unbind()), ranks, list(ranks.unbind()))
        values, value_views, ranks, rank_views = self._scalar_staging
        modules = weights.modules
        scalings = [modules[name].scaling if name in modules else 0.0 for name in self.lora_modules]
        values.copy_(torch.tensor(scalings, dtype=torch.float32), non_blocking=True)
        ranks.copy_(torch.tensor([modules[name].rank if name in modules else 0 for name in self.lora_modules],
                                 dtype=torch.int32), non_blocking=True)  # fmt: skip
        torch._foreach_copy_(scalars[0], value_views)
        torch._foreach_copy_(scalars[1], rank_views)

    def forget_write_plans(self) -> None:
        """Drop the views `_write_packed` keeps per slot and layout (the next write into each slot makes them anew)."""
        self._write_plans.clear()
        self._slot_scalars.clear()

    def _write_plan(
        self, slot: int, weights: LoraWeights, staged: torch.Tensor, row_major: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[BRun]]:
        """(slot views to fill, the staged buffer's views that fill them, the runs that turn a row-major B there)
        for an adapter of this layout: each matrix on the device is the staged buffer seen with its own offset and
        strides, each B rank-major (after the runs where the buffer holds it row-major)."""
        buffer = weights.buffer
        assert buffer is not None
        start = buffer.storage_offset()
        tensors = [t for lora in weights.modules.values() for t in (lora.a, lora.b)]
        assert sum(t.numel() for t in tensors) == buffer.numel() and tensors[0].data_ptr() == buffer.data_ptr()
        runs: list[BRun] = []
        if row_major:
            runs = b_runs((name.rsplit(".", 1)[-1], (m.b.shape[0], m.b.shape[1]), m.b.storage_offset() - start)
                          for name, m in weights.modules.items())  # fmt: skip
        base = staged.storage_offset()
        on_device = {}
        for name, m in weights.modules.items():
            (out, rank), a_at, b_at = m.b.shape, m.a.storage_offset() - start, m.b.storage_offset() - start
            a = staged.as_strided(m.a.shape, m.a.stride(), base + a_at)
            on_device[name] = (a, staged.as_strided((out, rank), (1, out), base + b_at))  # Bᵀ's memory, seen as B
        fills, sources = [], []
        for name, module in self.lora_modules.items():
            lora = weights.modules.get(name)
            if lora is not None:
                fills += module.slot_writes(slot, lora.rank)
                sources += on_device[name]
        return fills, sources, runs

    @property
    def cache_b_rank_major(self) -> bool:
        """Whether the CPU cache should hold B rank-major (turned when read) or as the file does. On a GPU it holds
        B row-major and `write_slot` turns it on the device, where it costs two kernels a projection: turning it
        on the CPU passed over every B twice more on the reading threads, beside the step loop (adapter read and slot
        write time in W2 10.6 -> 8.45 s: BENCHMARKS.md, eighth day). On the CPU it is turned when read: the write
        would do the same work, on the loader thread."""
        return self.device.type != "cuda"


class DecodeGraphs:
    """CUDA graphs of decode steps, captured on first use and replayed with the step's inputs copied in."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, scratch_block: int) -> None:
        self.model = model
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_batch = GRAPH_BATCH_SIZES[-1]
        self.max_width = -(-model.config.max_position_embeddings // block_size)
        self.in_place = attention.TRITON_DECODE  # decode attention reads blocks in place (else a padded gather)
        device = model.lm_head_weight.device
        # Static inputs, rows of (5, max_batch): token ids, positions, flat KV index, adapter slot, context length.
        self.vectors = torch.zeros(5, self.max_batch, dtype=torch.long, device=device)
        self.tables = torch.full((self.max_batch, self.max_width), scratch_block, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _shape(self, chunks: list[Chunk]) -> tuple[int, int]:
        """(padded batch size, block-table width) for a batch of decode chunks."""
        size = next(s for s in GRAPH_BATCH_SIZES if s >= len(chunks))
        if self.in_place:
            return size, self.max_width  # the kernel reads each sequence's own blocks: one graph per size
        needed = max((c.start // self.block_size) + 1 for c in chunks)
        width = 1 << (needed - 1).bit_length()  # a power of two, so that few widths are ever captured
        return size, min(width, self.max_width)

    def fits(self, chunks: list[Chunk]) -> bool:
        if not chunks or len(chunks) > self.max_batch:
            return False
        if any(len(c.token_ids) != 1 or c.all_logits for c in chunks):
            return False
        size, width = self._shape(chunks)
        return self.in_place or size * width * self.block_size <= GRAPH_MAX_GATHER

    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        n = len(chunks)
        size, width = self._shape(chunks)
        bs = self.block_size
        scratch = self.scratch_block * bs
        vectors = torch.zeros(5, size, dtype=torch.long)
        vectors[2].fill_(scratch)
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
        used_width = min(width, max((c.start // bs) + 1 for c in chunks))
        tables = block_table_rows([c.block_table for c in chunks], used_width, self.scratch_block, rows=size)
        lora = self.model.num_lora_slots > 0 and any(c.slot >= 0 for c in chunks)
        vectors, tables = to_device([vectors, tables], self.vectors.device)  # without waiting for the device
        self.vectors[:, :size].copy_(vectors)
        self.tables[:size, :used_width].copy_(tables)
        key = (size, width, lora)
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
        width = self.max_width if self.in_place else 1
        for lora in (False, True) if self.model.num_lora_slots else (False,):
            for size in GRAPH_BATCH_SIZES:
                if (size, width, lora) not in self.graphs:
                    self.graphs[(size, width, lora)] = self._capture(size, width, lora)

    def _forward(self, size: int, width: int, lora: bool) -> torch.Tensor:
        v = self.vectors
        ctx = BatchContext(
            kv_index=v[2, :size],
            token_slots=v[3, :size] if lora else None,
            query_ranges=[],
            context_index=[],
            block_tables=self.tables[:size, :width],
            context_lens=v[4, :size],
        )
        hidden = self.model(v[0, :size], v[1, :size], ctx)
        return self.model.compute_logits(hidden)  # (size, vocab) fp32

    def _capture(self, size: int, width: int, lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels); it computes the same step the
        # replay will, so the K/V it writes are the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size, width, lora)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: the adapter loader thread may copy into slots (on its own stream) during a capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._forward(size, width, lora)
        return graph, logits
