"""Adapter slot memory on the device, and its one owner: which adapter each slot holds, which pages are free, the
reservations that drain a slot for a waiting request, the slot writes under way and which slots are ready.

Slot memory is cut into pages of `page_rank` rows (`slots.SlotLayout`). A slot is a run of pages holding one adapter:
the power of two of pages its rank needs, aligned to that size (a buddy layout, so a slot never straddles two runs
of its size); it is identified by its first page, the index a batch carries per token. `claim` takes the best
aligned run whose adapters may all leave: an empty one first, then one whose adapters are stale, not wanted by
waiting requests, and least recently used. A slot holds pins (requests that will run on it); only an unpinned,
ready slot is ever reused. A new revision of a repo (`retire`) marks the slots of the older ones stale: they serve
the requests that hold them, and are the first to be reused once their last request ends.

A claim queues its slot's write; the step loop issues the writes of its claims once a step's forward is queued
(`issue_writes`: their copies run beside that step) and marks their slots ready once it sees the copies done
(`complete_writes`). So the step loop never waits for a host-to-device copy, no other thread takes the GIL to write
a slot, and a slow read (`adapter_cache`, on other threads) never holds up the write of an adapter already read. A
write waits only for the device work queued before its claim (`SlotWriter.fence`), the only work that may still read
the slot's previous adapters, not for the steps queued since. A write that fails holds its slot until the step loop
takes the failure (`failed_writes`) and ends the requests pinned to it.

Everything here runs on the step loop's thread: there is no lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramux.server.layers.slots import SlotLayout
from loramux.server.models.lora_weights import LoraWeights

if TYPE_CHECKING:
    from loramux.server.engine.slot_writer import SlotWriter

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """The state of a slot, kept at its first page (a page inside a slot, or free, has the default)."""

    key: str | None = None  # repo@commit it holds (or is loading)
    ready: bool = False  # False while loading
    pins: int = 0  # requests assigned to it that have not finished
    last_used: int = 0
    stale: bool = False  # a newer revision of its repo exists
    pages: int = 0  # its length
    failed: bool = False  # its write failed: held (not ready) until `failed_writes` hands it over, then freed


class AdapterSlots:
    """The slots of `layout`'s memory; `writer` does the copies (its `fence` and `write`)."""

    def __init__(self, layout: SlotLayout, writer: SlotWriter) -> None:
        self.layout = layout
        self.writer = writer
        self._slots = [Slot() for _ in range(layout.pages)]  # by page; a slot's state at its first page
        self._slot_at = [-1] * layout.pages  # page -> first page of the slot holding it, -1 = free
        self._heads: set[int] = set()  # first pages of the slots in use
        self._resident: dict[str, int] = {}  # key -> slot, for every slot holding (or loading) a current revision
        self._tick = 0
        # first page of a run -> (the owner it drains for, the run's length in pages)
        self._reserved: dict[int, tuple[Hashable, int]] = {}
        self.max_reserved = max(1, layout.num_slots // 16)  # runs reserved at once: one per 16 slots of max rank
        # Counts the changes that may let a claim that found no room succeed (a slot unpinned, loaded or freed, a
        # reservation given up): while it stands still, a claim that failed fails again (`Scheduler` skips it).
        self.changes = 0
        self._to_write: list[tuple[int, str, LoraWeights, object]] = []  # claims whose writes are not issued yet
        self._writing: list[tuple[int, str, LoraWeights, object]] = []  # writes issued and not seen complete
        self._failed: list[tuple[int, str, Exception]] = []  # writes that failed, for `failed_writes`
        self.slot_loads = self.write_failures = 0
        self.write_seconds = 0.0  # host time the step loop spent issuing writes

    # -- what the scheduler asks ---------------------------------------------------------------------------------

    def slot_of(self, key: str) -> int | None:
        """The slot holding (or loading) `key`, if it is a current revision."""
        return self._resident.get(key)

    def resident(self) -> dict[str, int]:
        """{key: slot} of every slot holding (or loading) a current revision."""
        return dict(self._resident)

    def pages_for(self, rank: int) -> int:
        return self.layout.pages_for(rank)

    def is_ready(self, slot: int) -> bool:
        return self._slots[slot].ready

    def pin(self, slot: int) -> None:
        self._tick += 1
        self._slots[slot].pins += 1
        self._slots[slot].last_used = self._tick

    def unpin(self, slot: int) -> None:
        self._slots[slot].pins -= 1
        self.changes += 1

    def claim(self, key: str, weights: LoraWeights, owner: Hashable = None, keep: Collection[str] = ()) -> int | None:
        """Start loading `key` into a slot of the pages its rank needs, outside the runs reserved for others than
        `owner`, and return the slot; None if no such run is free or may be emptied (every adapter in it unpinned,
        loaded). The write is queued for `issue_writes`.

        Preference: an empty run, then one whose adapters are stale revisions, then one holding no adapter in `keep`
        (adapters that waiting requests want), then the one whose adapters were used least recently, then fewest.
        """
        size = self.layout.pages_for(weights.max_rank)
        # Slots are aligned to their size, so a slot lies inside a candidate run of `size` pages or covers it: one
        # pass over the slots gives every candidate's occupants (runs with none are empty).
        occupied: dict[int, list] = {}  # candidate -> [blocked, any fresh, any kept, latest use, count]
        for start, (other, pages) in self._reserved.items():  # runs reserved for others: no candidate overlaps them
            if other is not owner:
                for run in range(start // size, (start + pages - 1) // size + 1):
                    occupied.setdefault(run, [False, False, False, 0, 0])[0] = True
        for head in self._heads:
            slot = self._slots[head]
            blocked = slot.pins > 0 or not slot.ready
            for run in range(head // size, (head + slot.pages - 1) // size + 1):
                state = occupied.setdefault(run, [False, False, False, 0, 0])
                if blocked:
                    state[0] = True
                    continue
                state[1] |= not slot.stale
                state[2] |= slot.key in keep
                state[3] = max(state[3], slot.last_used)
                state[4] += 1
        runs = len(self._slots) // size
        if len(occupied) < runs:
            index = next(run for run in range(runs) if run not in occupied) * size
        else:
            candidates = [(tuple(state[1:]), run) for run, state in occupied.items() if not state[0]]
            if not candidates:
                return None
            index = min(candidates)[1] * size
            for head in {self._slot_at[p] for p in range(index, index + size)}:
                self._release(head)
        self._slots[index] = Slot(key=key, ready=False, pages=size)
        self._slot_at[index : index + size] = [index] * size
        self._heads.add(index)
        self._resident[key] = index
        self._to_write.append((index, key, weights, self.writer.fence()))
        return index

    # -- reservations --------------------------------------------------------------------------------------------

    @property
    def may_reserve(self) -> bool:
        return len(self._reserved) < self.max_reserved

    def reservations(self) -> dict[int, tuple[Hashable, int]]:
        """{first page: (owner, pages)} of every reserved run."""
        return dict(self._reserved)

    def holds_reservation(self, owner: Hashable) -> bool:
        return any(other is owner for other, _ in self._reserved.values())

    def reserved_for_another(self, slot: int, owner: Hashable) -> bool:
        """Whether `slot` overlaps a run reserved for another owner than `owner` (its pins then drain for that one)."""
        return self._overlaps_reservation(slot, self._slots[slot].pages, owner)

    def _overlaps_reservation(self, start: int, pages: int, owner: Hashable) -> bool:
        return any(
            other is not owner and begin < start + pages and start < begin + length
            for begin, (other, length) in self._reserved.items()
        )

    def reserve(self, owner: Hashable, pages: int, ends: dict[int, int]) -> None:
        """Reserve for `owner` the run of `pages` pages (aligned to its length, as slots are) whose pinned requests
        all end soonest, among the runs no other owner has reserved: no new request pins a slot in it, so it drains,
        and it goes to `owner`'s claim. `ends`: {slot: tokens left of its longest pinned request}."""
        if not self.may_reserve:
            return
        left: dict[int, int] = {}  # run -> tokens left of its longest pinned request
        for slot, to_go in ends.items():
            slot_pages = max(1, self._slots[slot].pages)
            for run in range(slot // pages, (slot + slot_pages - 1) // pages + 1):
                left[run] = max(left.get(run, 0), to_go)
        free = [run for run in left if not self._overlaps_reservation(run * pages, pages, owner)]
        if free:
            self._reserved[min(free, key=left.__getitem__) * pages] = (owner, pages)

    def unreserve(self, owner: Hashable) -> None:
        """Give up the runs reserved for `owner` (it got a slot, or ended)."""
        for start in [start for start, (other, _) in self._reserved.items() if other is owner]:
            del self._reserved[start]
            self.changes += 1

    # -- writes --------------------------------------------------------------------------------------------------

    def issue_writes(self) -> int:
        """Issue the slot writes of the claims made since the last call -> how many. The step loop calls it once a
        step's forward is queued, so that the copies run beside that step. A write that fails is held for
        `failed_writes`."""
        issued, self._to_write = self._to_write, []
        for index, key, weights, after in issued:
            started = time.perf_counter()
            try:
                done = self.writer.write(index, weights, after)
            except Exception as exc:
                self._write_failed(index, key, exc)
                continue
            finally:
                self.write_seconds += time.perf_counter() - started  # the host time it cost the step loop
            self._writing.append((index, key, weights, done))  # the weights kept until the copies are done
        if issued:
            self.complete_writes()  # those done already (on the CPU, all)
        return len(issued)

    def complete_writes(self, wait: bool = False) -> int:
        """Mark ready the slots whose issued writes are done (with `wait`, after waiting for all of them) -> how
        many writes are still under way. `done` (what `SlotWriter.write` returned) has `query()` and
        `synchronize()`; None: done at once."""
        under_way = []
        for write in self._writing:
            index, key, _, done = write
            if done is not None and not wait and not done.query():
                under_way.append(write)
                continue
            if done is not None and wait:
                done.synchronize()
            self._loaded(index, key)
        self._writing = under_way
        return len(under_way)

    def writes_pending(self) -> int:
        """Claims whose slot writes are not issued yet or not seen complete."""
        return len(self._to_write) + len(self._writing)

    def failed_writes(self) -> list[tuple[int, str, Exception]]:
        """The slot writes that failed since the last call, (slot, key, error), their slots freed now: the caller
        ends the requests pinned to those slots (their adapter is not there, and their pins went with the slot)."""
        failed, self._failed = self._failed, []
        for index, key, _ in failed:
            if self._slots[index].key == key and self._slots[index].failed:
                self._release(index)
        return failed

    def _write_failed(self, index: int, key: str, exc: Exception) -> None:
        """Hold slot `index` as failed until the step loop takes the failure (`failed_writes`): requests pinned to it
        meanwhile are ended with the others, and no claim takes its pages before then."""
        log.exception("writing adapter %s into slot %d failed", key, index)  # called where `exc` is handled
        self.write_failures += 1
        if self._slots[index].key == key:
            self._slots[index].failed = True
            self._failed.append((index, key, exc))

    def _loaded(self, index: int, key: str) -> None:
        """Mark slot `index` ready once `key`'s write is done (unless the slot was given to another adapter since)."""
        slot = self._slots[index]
        if slot.key == key:
            slot.ready = True
        self.changes += 1
        self.slot_loads += 1

    # -- revisions, freeing, figures -----------------------------------------------------------------------------

    def retire(self, repo: str, commit: str) -> None:
        """`commit` is the newest revision of `repo`: the slots holding another revision of it are stale (no new
        request is served from them; they are reused first)."""
        prefix, current = f"{repo}@", f"{repo}@{commit}"
        for head in self._heads:
            slot = self._slots[head]
            if slot.key is not None and slot.key.startswith(prefix) and slot.key != current:
                slot.stale = True
                if self._resident.get(slot.key) == head:
                    del self._resident[slot.key]

    def _release(self, index: int) -> None:
        """Free the slot starting at page `index`."""
        slot = self._slots[index]
        pages = max(1, slot.pages)
        self.changes += 1
        self._slot_at[index : index + pages] = [-1] * pages
        if slot.key is not None and self._resident.get(slot.key) == index:
            del self._resident[slot.key]
        self._slots[index] = Slot()
        self._heads.discard(index)

    def stats(self) -> dict[str, float]:
        slots = [self._slots[head] for head in self._heads]
        return {
            "slots_total": self.layout.num_slots,  # slots of the highest rank the memory holds
            "slots_used": sum(1 for s in slots if s.pins > 0),  # adapters that requests hold
            "slots_loaded": sum(1 for s in slots if s.ready),  # adapters resident
            "slot_pages_total": self.layout.pages,
            "slot_pages_used": sum(s.pages for s in slots),
            "adapter_slot_loads": self.slot_loads,
            "adapter_slot_write_seconds": self.write_seconds,
            "adapter_slot_write_failures": self.write_failures,
        }
