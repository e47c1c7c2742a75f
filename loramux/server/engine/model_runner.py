"""Runs one step of the model: builds the flat batch (tokens, positions, KV cache indices, adapter slot per token)
from the scheduled chunks (`batch.py`), runs the forward pass, and returns the logits rows that will be sampled.

On CUDA a step of decode tokens only (one new token per sequence) replays a CUDA graph (`decode_graphs.py`). A mixed
step (prompt chunks beside decode tokens, the common step under steady load) replays the decode graph for its decode
tokens and runs the prompt chunks in a pass of their own, queued behind the replay: that pass uploads its inputs
without waiting for the device (`loramux.server.transfer`), so no host synchronisation happens before the step's
logits are read. Passes of prompt chunks (and other steps no decode graph fits) replay piecewise graphs where their
token count has them (`prompt_graphs.py`: everything but the attention, padded to a captured count), else launch
kernel by kernel.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loramux.adapters.weights import LoraWeights
from loramux.server.engine.batch import Chunk, FlatBatch
from loramux.server.engine.decode_graphs import DecodeGraphs
from loramux.server.engine.prompt_graphs import PromptGraphs
from loramux.server.layers.attention import BatchContext, PrefillBatch
from loramux.server.models.llama import LlamaForCausalLM
from loramux.server.transfer import to_device

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
        self.graphs: DecodeGraphs | None = None
        self.prompt_graphs: PromptGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, block_size, scratch_block=num_blocks)
            if max_prompt_tokens > 0:
                self.prompt_graphs = PromptGraphs(model, num_blocks * block_size, max_prompt_tokens)
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
        graphed = [chunks[i] for i in decode]
        if not decode or len(decode) == len(chunks) or not self.graphs.fits(graphed):
            return self.run_pass(chunks)
        # A mixed step: its decode tokens replay a graph, the prompt chunks run in their own pass beside them. Each
        # sequence attends only to its own cache, so the split computes the same step as one pass.
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
        mixed step's prompt chunks) -> per chunk its logits: through the piecewise prompt graphs where they hold its
        token count (the attention eager between the pieces), else kernel by kernel."""
        flat = FlatBatch.of(chunks, self.block_size)
        graphs = self.prompt_graphs
        if graphs is not None and graphs.size_for(len(flat.ids)) is None:
            graphs = None
        lora = any(s >= 0 for s in flat.slots)
        host = flat.decode_inputs(chunks, self.block_size)  # what goes to the device, in one copy that does not wait
        if graphs is not None:  # ids, positions, cache indices and slots padded to a captured count, in one tensor
            host["inputs"] = graphs.pad(flat.ids, flat.positions, flat.kv_index, flat.slots)
        else:
            if lora:
                host["token_slots"] = torch.tensor(flat.slots, dtype=torch.long)
            host["ids"] = torch.tensor(flat.ids, dtype=torch.long)
            host["positions"] = torch.tensor(flat.positions, dtype=torch.long)
            host["kv_index"] = flat.kv_index
        rows = flat.sampled_rows(chunks)  # only the rows that are sampled go through the (large) output head
        host["rows"] = torch.cat(rows)
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
        if self.prompt_graphs is not None:
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
