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
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loramux.adapters.weights import LoraWeights
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
# Slot-write plans kept (the copies that write an adapter of one layout, whatever the slot; a few per projection)
WRITE_PLANS_KEPT = 256
_MODULE = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


@dataclass
class _WritePlan:
    """How an adapter of one layout is written into a slot (`ModelRunner._write_plan`)."""

    # (projection, rank, the layers (a device tensor), offset of the first A, step between As, the same for B)
    runs: list[tuple[str, int, torch.Tensor, int, int, int, int]]
    columns: list[int]  # each module's column of the ranks and scalings, in the buffer's order
    ranks: torch.Tensor  # (modules,) int32: the slot's rank in every module


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
        # `_write_packed`'s staging buffer on the device, and its copies per adapter layout
        self._staging: torch.Tensor | None = None
        self._write_plans: OrderedDict[tuple, _WritePlan] = OrderedDict()

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
            if weights is None or not self._write_packed(slot, weights):
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

    def _write_packed(self, slot: int, weights: LoraWeights) -> bool:
        """`issue_write` for an adapter in one buffer (as `load_lora` and `prepare_adapter` make it) into the model's
        `SlotMemory` -> False where it cannot (no such memory, or another dtype): the caller writes module by module.

        The buffer goes to the device in one copy, into a staging buffer kept for it (on the CPU it is read in
        place); then, per projection, one copy takes its A of every layer into the slot's rows of the projection's
        A memory and one its B (turned rank-major on the way where the buffer holds it as the file does), and one
        copy each sets the slot's rank and scaling in every module. So a write is a few torch calls a projection
        whatever the layer count, host time the step loop spends while the device computes (a loader thread's calls
        beside it would keep it waiting for the GIL). Views of every module's part of the slot would take ~900 calls
        for the first write of a W2 adapter into a slot, ~4.8 ms of host time on an H200 host. The copies of a layout
        (its modules, their ranks, where each lies in the buffer) are worked out once and kept (`_write_plans`),
        whatever the slot."""
        memory = self.model.lora_slot_memory
        buffer = weights.buffer
        if memory is None or buffer is None or buffer.dtype != memory.dtype:
            return False
        # the buffer holds A and B module after module, in the adapter's order, with no gaps: its layout is the
        # modules' names and ranks, its dtype, and whether B is row-major (a rank-1 B reads the same either way)
        row_major = any(m.b.stride(0) != 1 for m in weights.modules.values())
        layout = (buffer.dtype, row_major, tuple((name, m.rank) for name, m in weights.modules.items()))
        plan = self._write_plans.pop(layout, None)
        if plan is None:
            plan = self._write_plan(weights, row_major)
            if plan is None:
                return False
        self._write_plans[layout] = plan  # the most recently used last
        while len(self._write_plans) > WRITE_PLANS_KEPT:
            self._write_plans.popitem(last=False)
        if self.device.type == "cpu":
            staged = buffer
        else:
            if self._staging is None or self._staging.numel() < buffer.numel() or self._staging.dtype != buffer.dtype:
                self._staging = torch.empty(buffer.numel(), dtype=buffer.dtype, device=self.device)
            staged = self._staging[: buffer.numel()]
            staged.copy_(buffer, non_blocking=True)
        base, row = staged.storage_offset(), slot * memory.layout.page_rank
        for projection, rank, layers, a_at, a_step, b_at, b_step in plan.runs:
            a_memory, first = memory.a[projection]
            b_memory = memory.b[projection]
            count, width, out = layers.numel(), a_memory.shape[2], b_memory.shape[2]
            a = staged.as_strided((count, rank, width), (a_step, width, 1), base + a_at)
            a_memory[:, first + row : first + row + rank].index_copy_(0, layers, a)
            b = staged.as_strided((count, rank, out), (b_step, 1, rank) if row_major else (b_step, out, 1), base + b_at)
            b_memory[:, row : row + rank].index_copy_(0, layers, b)  # Bᵀ, rank-major
        scalings = [0.0] * memory.scalings.shape[1]
        for column, module in zip(plan.columns, weights.modules.values(), strict=True):
            scalings[column] = module.scaling
        memory.ranks[slot].copy_(plan.ranks, non_blocking=True)
        memory.scalings[slot].copy_(torch.tensor(scalings, dtype=torch.float32), non_blocking=True)
        return True

    def forget_write_plans(self) -> None:
        """Drop the copies `_write_packed` keeps per adapter layout (the next write of each layout works them out)."""
        self._write_plans.clear()

    def _write_plan(self, weights: LoraWeights, row_major: bool) -> _WritePlan | None:
        """The copies that write an adapter of this layout into a slot (see `_write_packed`), or None where a module is
        not one of the slot memory's. A run is a projection's modules of one rank whose A and B lie at one stride
        from the last in the buffer (every layer's, for an adapter with one rank a projection): one copy for A, one
        for B, into the layers it names (in the buffer's order, which sorts layers by name: 0, 1, 10, 11, ...)."""
        memory = self.model.lora_slot_memory
        buffer = weights.buffer
        assert memory is not None and buffer is not None
        start = buffer.storage_offset()
        tensors = [t for m in weights.modules.values() for t in (m.a, m.b)]
        assert sum(t.numel() for t in tensors) == buffer.numel() and tensors[0].data_ptr() == buffer.data_ptr()
        open_runs: dict[tuple[str, int], list] = {}  # (projection, rank) -> [layers, a at, a step, b at, b step]
        runs: list[tuple[str, int, list[int], int, int, int, int]] = []
        columns = []
        ranks = torch.zeros(memory.ranks.shape[1], dtype=torch.int32)
        for name, m in weights.modules.items():
            found = _MODULE.fullmatch(name)
            where = None if found is None else (found.group(2), int(found.group(1)))
            if where is None or where not in memory.columns:
                return None
            projection, layer = where
            columns.append(memory.columns[where])
            ranks[columns[-1]] = m.rank
            a_at, b_at = m.a.storage_offset() - start, m.b.storage_offset() - start
            run = open_runs.get((projection, m.rank))
            if run is not None and len(run[0]) == 1:
                run[0].append(layer)
                run[2], run[4] = a_at - run[1], b_at - run[3]
            elif run is not None and (a_at, b_at) == (run[1] + run[2] * len(run[0]), run[3] + run[4] * len(run[0])):
                run[0].append(layer)
            else:
                if run is not None:
                    runs.append((projection, m.rank, *run))  # type: ignore[arg-type]
                open_runs[(projection, m.rank)] = [[layer], a_at, 0, b_at, 0]
        runs += [(projection, rank, *run) for (projection, rank), run in open_runs.items()]  # type: ignore[misc]
        on_device = [
            (projection, rank, torch.tensor(layers, device=self.device), a_at, a_step, b_at, b_step)
            for projection, rank, layers, a_at, a_step, b_at, b_step in runs
        ]
        return _WritePlan(on_device, columns, ranks)

    @property
    def cache_b_rank_major(self) -> bool:
        """Whether the CPU cache should hold B rank-major (turned when read) or as the file does. On a GPU it holds
        B row-major and `issue_write` turns it on the device, in the copy into the slot: turning it on the CPU passed
        over every B twice more on the reading threads, beside the step loop (adapter read and slot write time over
        the W2 benchmark on an H200: 10.6 s that way, 8.45 s turned on the device). On the CPU it is turned when
        read, and the write copies it as it is."""
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
        # thread_local: an adapter loader thread (step_thread_slot_writes off) may copy into slots during a capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._forward(size, width, lora)
        return graph, logits
