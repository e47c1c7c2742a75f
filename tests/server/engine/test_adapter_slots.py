"""Slot memory's bookkeeping, on its own (the copies recorded by a stand-in writer): slots paged by rank and taken
whole, the least recently used emptied first, reservations, writes issued by the step loop with the fence of their
claim, failed writes, stale revisions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loramux.server.engine.adapter_slots import AdapterSlots
from loramux.server.layers.slots import SlotLayout


class FakeDone:
    """What an issued write completes at: done once the test says so."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


class FakeWriter:
    """Records the fences taken and the writes issued; a write is done at once (None, as on the CPU), or when the
    test says so (`deferred`); adapters of a rank in `refused` raise."""

    def __init__(self, deferred: bool = False, refused: tuple[int, ...] = ()) -> None:
        self.deferred, self.refused = deferred, refused
        self.fences = 0
        self.written: list[tuple[int, object, object]] = []  # (slot, weights, fence)
        self.handles: dict[int, FakeDone] = {}

    def fence(self) -> int:
        self.fences += 1
        return self.fences - 1

    def write(self, slot: int, weights, after) -> FakeDone | None:
        if weights.max_rank in self.refused:
            raise RuntimeError("out of memory")
        self.written.append((slot, weights, after))
        if not self.deferred:
            return None
        self.handles[slot] = FakeDone()
        return self.handles[slot]


def rank(r: int) -> SimpleNamespace:
    return SimpleNamespace(max_rank=r)  # what a claim reads of the weights


def slots_of(max_rank: int = 32, num_slots: int = 1, writer: FakeWriter | None = None) -> AdapterSlots:
    return AdapterSlots(SlotLayout.of(num_slots, max_rank), writer or FakeWriter())  # pages of rank 8


def test_slot_memory_is_paged_by_rank_and_slots_are_taken_whole():
    writer = FakeWriter()
    slots = slots_of(writer=writer)  # one slot of rank 32: four pages of rank 8
    a, b, c = (slots.claim(key, rank(r)) for key, r in (("a", 8), ("b", 16), ("c", 3)))
    assert (a, b, c) == (0, 2, 1)  # b needs an aligned pair of pages; c fits the page left beside a
    assert not slots.is_ready(a) and slots.issue_writes() == 3 and all(slots.is_ready(i) for i in (a, b, c))
    assert sorted((i, w.max_rank) for i, w, _ in writer.written) == [(0, 8), (1, 3), (2, 16)]
    for index in (a, b, c):
        slots.pin(index)
    assert slots.claim("d", rank(8)) is None  # every page is held
    slots.unpin(c)
    assert slots.claim("d", rank(16)) is None  # each pair still holds a pinned adapter
    d = slots.claim("d", rank(8))
    assert d == c and slots.resident() == {"a": 0, "d": 1, "b": 2} and slots.slot_of("c") is None
    slots.issue_writes()
    slots.unpin(a)
    slots.unpin(b)
    slots.pin(d)
    assert slots.claim("e", rank(16)) == 2  # pages 0-1 hold d, pinned: b's pair goes
    slots.issue_writes()
    slots.unpin(d)
    assert slots.claim("f", rank(32), keep={"e"}) == 0  # the whole slot: a, d and e leave
    assert slots.resident() == {"f": 0}
    stats = slots.stats()
    assert (stats["slots_total"], stats["slot_pages_total"], stats["slot_pages_used"]) == (1, 4, 4)


def test_a_slot_whose_adapters_were_used_least_recently_is_emptied_first():
    slots = slots_of()
    for key in "wxyz":
        slots.claim(key, rank(8))
    slots.issue_writes()
    for index in (0, 1, 3, 2):  # pages 0-1 used first, then page 3, then page 2 last
        slots.pin(index)
        slots.unpin(index)
    assert slots.claim("pair", rank(16)) == 0
    assert slots.resident() == {"pair": 0, "y": 2, "z": 3}
    slots.issue_writes()
    slots.pin(0)  # pair is now the most recent
    slots.unpin(0)
    assert slots.claim("one", rank(8), keep={"z"}) == 2  # z is wanted: y goes, not z
    slots.issue_writes()
    slots.pin(2)
    slots.unpin(2)
    assert slots.claim("two", rank(8)) == 3  # z was used before pair and one


def test_a_reserved_run_is_kept_from_other_claims_and_drains_for_its_owner():
    slots = slots_of(max_rank=32, num_slots=2)  # 8 pages of rank 8; one reservation at a time
    for key, r in (("a", 32), ("b", 16), ("c", 16)):  # a on pages 0-3, b on 4-5, c on 6-7
        slots.pin(slots.claim(key, rank(r)))
    slots.issue_writes()
    slots.reserve("waiter", 2, ends={0: 50, 4: 3, 6: 9})  # b's pair ends soonest
    assert slots.reservations() == {4: ("waiter", 2)} and slots.holds_reservation("waiter")
    assert slots.reserved_for_another(4, "someone") and not slots.reserved_for_another(4, "waiter")
    assert not slots.reserved_for_another(6, "someone")
    assert not slots.may_reserve
    slots.reserve("other", 2, ends={6: 1})  # the limit: one reservation for two slots of max rank
    assert list(slots.reservations()) == [4]
    slots.unpin(4)
    slots.unpin(6)
    assert slots.claim("d", rank(16), owner="someone") == 6  # not b's reserved pair, though b was used earlier
    slots.issue_writes()
    slots.pin(6)
    assert slots.claim("e", rank(8), owner="someone") is None  # the only unpinned pages lie in the reserved run
    assert slots.claim("e", rank(8), owner="waiter") == 4  # its owner's claim takes them
    before = slots.changes
    slots.unreserve("waiter")  # a reservation given up: a claim that found no room may fare otherwise now
    assert slots.reservations() == {} and slots.changes == before + 1 and slots.may_reserve


def test_claims_queue_their_writes_with_the_fence_of_the_claim_and_slots_are_ready_once_the_writes_are_done():
    """The step loop issues the writes of its claims after the step's forward; each write waits for the fence taken
    when its slot was claimed, and a slot is ready only once its write is seen done, its weights held until then."""
    writer = FakeWriter(deferred=True)
    slots = slots_of(writer=writer)
    a_weights, b_weights = rank(8), rank(16)
    a, b = slots.claim("a", a_weights), slots.claim("b", b_weights)
    assert writer.fences == 2 and writer.written == [] and slots.writes_pending() == 2  # nothing written yet
    assert slots.issue_writes() == 2 and slots.issue_writes() == 0
    assert writer.written == [(a, a_weights, 0), (b, b_weights, 1)]  # each with the fence of its claim
    assert not slots.is_ready(a) and not slots.is_ready(b)
    writer.handles[b].done = True
    before = slots.changes
    assert slots.complete_writes() == 1  # a still under way
    assert slots.is_ready(b) and not slots.is_ready(a) and slots.changes > before
    assert slots.complete_writes(wait=True) == 0 and writer.handles[a].waited and slots.is_ready(a)
    assert slots.writes_pending() == 0 and slots.stats()["adapter_slot_loads"] == 2


def test_a_write_that_fails_holds_its_slot_until_the_failure_is_taken_then_frees_it():
    """A write that fails holds its slot (not ready, not claimable) until the step loop takes the failure, so that
    it can end the requests pinned to it; then the slot is free."""
    slots = slots_of(writer=FakeWriter(refused=(16,)))
    a = slots.claim("a", rank(8))
    b = slots.claim("b", rank(16))
    assert slots.issue_writes() == 2
    assert slots.is_ready(a) and not slots.is_ready(b) and slots.writes_pending() == 0
    slots.pin(a)  # a request runs on a
    assert slots.claim("c", rank(16)) is None  # b's pages are held, a's in use
    ((index, key, error),) = slots.failed_writes()
    assert (index, key, str(error)) == (b, "b", "out of memory") and slots.failed_writes() == []
    assert slots.resident() == {"a": a} and slots.stats()["adapter_slot_write_failures"] == 1
    assert slots.claim("c", rank(16)) == b


@pytest.mark.parametrize("pinned", [False, True])
def test_the_slots_of_an_older_revision_go_stale_and_are_reused_first(pinned):
    slots = slots_of(max_rank=16)  # two pages
    old, other = slots.claim("t/a@1", rank(8)), slots.claim("t/b@1", rank(8))
    slots.issue_writes()
    slots.pin(other)
    slots.unpin(other)  # t/b used after t/a: t/a would go first anyway, so make it the more recent
    slots.pin(old)
    slots.retire("t/a", "2")
    assert slots.resident() == {"t/b@1": other} and slots.slot_of("t/a@1") is None
    slots.retire("t/b", "1")  # its own revision: nothing goes stale
    assert slots.slot_of("t/b@1") == other
    if pinned:  # a stale slot serves the requests that hold it, and is not reused while they run
        assert slots.claim("t/a@2", rank(8)) == other
        return
    slots.unpin(old)
    assert slots.claim("t/a@2", rank(8)) == old  # the stale slot goes first, though t/b was used less recently
