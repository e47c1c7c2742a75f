"""Copies of adapters into the model's slot memory (`layers.lora.SlotMemory`), queued without waiting for them.

`AdapterSlots` decides which slot an adapter goes to and when; this module does the copies. The step loop queues
them (`write`) once a step's forward is queued, so that on a GPU they run beside that step on a stream of their own,
and the returned event tells when the slot may serve. Writes are issued from one thread (the step loop).
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loramux.server.models.llama import LlamaForCausalLM
from loramux.server.models.lora_weights import LoraWeights

# Write plans kept (the copies that write an adapter of one layout, whatever the slot; a few per projection)
WRITE_PLANS_KEPT = 256
_MODULE = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


@dataclass
class _WritePlan:
    """How an adapter of one layout is written into a slot (`SlotWriter._plan`)."""

    # (projection, rank, the layers (a device tensor), offset of the first A, step between As, the same for B)
    runs: list[tuple[str, int, torch.Tensor, int, int, int, int]]
    columns: list[int]  # each module's column of the ranks and scalings, in the buffer's order
    ranks: torch.Tensor  # (modules,) int32: the slot's rank in every module
    row_major: bool  # the buffer holds B as the file does: the copy turns it


class SlotWriter:
    """Writes adapters into the slot memory of `model` (allocated before: `allocate_lora_slots`)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.device = model.lm_head_weight.device
        self.lora_modules = model.lora_modules()
        self._stream: torch.cuda.Stream | None = None  # the copies' own stream, on a GPU
        # `_write_packed`'s staging buffer on the device, and its copies per adapter layout
        self._staging: torch.Tensor | None = None
        self._plans: OrderedDict[tuple, _WritePlan] = OrderedDict()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the slot memory, which the CPU cache keeps adapters in (fp32 when the model has no LoRA
        modules)."""
        return next(iter(self.lora_modules.values())).compute_dtype if self.lora_modules else torch.float32

    @property
    def b_rank_major(self) -> bool:
        """Whether the CPU cache should hold B rank-major (turned when read) or as the file does. On a GPU it holds
        B row-major and `write` turns it on the device, in the copy into the slot: turning it on the CPU passed over
        every B twice more on the reading threads, beside the step loop (adapter read and slot write time over the
        W2 workload on an H200: 10.6 s that way, 8.45 s turned on the device). On the CPU it is turned when read, and
        the write copies it as it is."""
        return self.device.type != "cuda"

    def fence(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on this thread's stream (the step stream, when the step loop calls
        it), for `write(..., after=)`; None on the CPU."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def write(
        self, slot: int, weights: LoraWeights | None, after: torch.cuda.Event | None = None
    ) -> torch.cuda.Event | None:
        """Queue the load of an adapter into `slot` of every decoder linear layer (rank 0 where it has no module;
        None clears the slot) and return an event the copies complete at, without waiting for them; None on the
        CPU, where they are done.

        The slot must be in use by no request. On the GPU the copies go on a stream of their own, so they overlap the
        step's kernels; that stream first waits for `after` (`fence`, taken when the slot was claimed: the steps
        queued until then may still read the slot's previous adapters; the ones queued since do not use the slot),
        or, without it, for all the work queued on the step stream. Waiting for everything would make each write
        wait out the step in flight (and a queue of writes one step each). `weights` (its CPU buffer) must be kept
        until the event completes.
        """
        with contextlib.ExitStack() as stack:
            stream = None
            if self.device.type == "cuda":
                if self._stream is None:
                    self._stream = torch.cuda.Stream(self.device)
                stream = self._stream
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
        """`write` for an adapter in one buffer (as `load_lora` and `LoraWeights.packed` make it) into the model's
        `SlotMemory` -> False where it cannot (no such memory, or another dtype): the caller writes module by module.

        The buffer goes to the device in one copy, into a staging buffer kept for it (on the CPU it is read in
        place); then, per projection, one copy takes its A of every layer into the slot's rows of the projection's
        A memory and one its B (turned rank-major on the way where the buffer holds it as the file does), and one
        copy each sets the slot's rank and scaling in every module. So a write is a few torch calls a projection
        whatever the layer count, host time the step loop spends while the device computes (a thread writing beside
        the step loop would keep its kernel launches waiting for the GIL instead). Views of every module's
        part of the slot would take ~900 calls for the first write of an adapter on q_proj and v_proj of the 8B
        shape into a slot, ~4.8 ms of host time on an H200 host. The copies of a layout (its modules, their ranks,
        where each lies in the buffer) are worked out once and kept (`_plans`), whatever the slot."""
        memory = self.model.lora_slot_memory
        buffer = weights.buffer
        if memory is None or buffer is None or buffer.dtype != memory.dtype:
            return False
        plan = self._plan_for(weights)
        if plan is None:
            return False
        if self.device.type == "cpu":
            staged = buffer
        else:
            if self._staging is None or self._staging.numel() < buffer.numel() or self._staging.dtype != buffer.dtype:
                self._staging = torch.empty(buffer.numel(), dtype=buffer.dtype, device=self.device)
            staged = self._staging[: buffer.numel()]
            staged.copy_(buffer, non_blocking=True)
        row_major = plan.row_major
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

    def _plan_for(self, weights: LoraWeights) -> _WritePlan | None:
        """The kept plan of the adapter's layout (worked out on first use), or None where it has none."""
        buffer = weights.buffer
        assert buffer is not None
        # the buffer holds A and B module after module, in the adapter's order, with no gaps: its layout is the
        # modules' names and ranks, its dtype, and whether B is row-major (a rank-1 B reads the same either way)
        row_major = any(m.b.stride(0) != 1 for m in weights.modules.values())
        layout = (buffer.dtype, row_major, tuple((name, m.rank) for name, m in weights.modules.items()))
        plan = self._plans.pop(layout, None)
        if plan is None:
            plan = self._plan(weights, row_major)
            if plan is None:
                return None
        self._plans[layout] = plan  # the most recently used last
        while len(self._plans) > WRITE_PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def _plan(self, weights: LoraWeights, row_major: bool) -> _WritePlan | None:
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
        return _WritePlan(on_device, columns, ranks, row_major)
