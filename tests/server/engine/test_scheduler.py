"""Scheduler policy for adapter slots, on the scheduler alone (no model): hits are never held back by a request
waiting for a slot, a reserved slot drains for its waiter, free slots holding wanted adapters are reused last."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loramux.core.adapter_source import AdapterRef
from loramux.server.engine.adapter_slots import AdapterSlots
from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, SamplingParams
from loramux.server.engine.scheduler import Scheduler
from loramux.server.layers.slots import SlotLayout


class InstantWriter:
    """Slot writes that are done once issued (the copies themselves are not this test's business)."""

    def fence(self) -> None:
        return None

    def write(self, slot: int, weights, after) -> None:
        return None


@pytest.fixture
def make():
    def build(num_slots: int, max_num_seqs: int = 64, max_rank: int = 8) -> Scheduler:
        slots = AdapterSlots(SlotLayout.of(num_slots, max_rank), InstantWriter())
        return Scheduler(BlockManager(256, 4), slots, max_num_seqs=max_num_seqs, max_num_batched_tokens=512)

    return build


def request(name: str, adapter: str, max_tokens: int = 4, rank: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    r = Request(name, [1, 2, 3], params, AdapterRef(adapter), None, set())
    r.adapter_key = f"{adapter}@{'0' * 40}"
    r.lora = SimpleNamespace(max_rank=rank)  # as fetched: what the claim reads (the slot writes here are no-ops)
    return r


def step(scheduler: Scheduler) -> list[str]:
    """Schedule until the slots of every request holding one are ready (the writes of a schedule's claims are issued
    after it, as the engine issues them after the step's forward); the names of the requests in the last batch."""
    for _ in range(3):
        batch = scheduler.schedule()
        loading = [r for r in scheduler.running + scheduler.fair_order() if r.slot >= 0]
        if all(scheduler.slots.is_ready(r.slot) for r in loading):
            names = [r.request_id for r, _ in batch]
            for r, n in batch:  # as the engine does after a step
                r.num_computed += n
                if r.num_computed >= r.num_tokens:
                    r.output_ids.append(0)
            return names
        scheduler.slots.issue_writes()
    raise AssertionError("slot writes never finished")


def key_at(scheduler: Scheduler, slot: int) -> str:
    """The adapter (repo@commit) slot `slot` holds."""
    return {index: key for key, index in scheduler.slots.resident().items()}[slot]


def owners(scheduler: Scheduler) -> list[str]:
    """The requests the reserved runs drain for."""
    return [owner.request_id for owner, _ in scheduler.slots.reservations().values()]


def finish(scheduler: Scheduler, *names: str) -> None:
    for r in list(scheduler.running):
        if r.request_id in names:
            scheduler.finish(r)


def test_hits_run_while_another_adapter_waits_for_a_slot(make):
    scheduler = make(num_slots=2)
    for r in (request("a0", "t/a", max_tokens=50), request("b0", "t/b", max_tokens=3)):
        scheduler.add(r)
    assert sorted(step(scheduler)) == ["a0", "b0"]
    scheduler.add(request("c0", "t/c"))  # no free slot: it reserves t/b's, which drains first
    scheduler.add(request("a1", "t/a"))  # a hit on the other slot
    admitted = step(scheduler)
    assert "a1" in admitted and "c0" not in admitted
    (reserved,) = scheduler.slots.reservations()
    assert key_at(scheduler, reserved).startswith("t/b")
    scheduler.add(request("b1", "t/b"))  # may not pin the reserved slot
    assert "b1" not in step(scheduler)
    finish(scheduler, "b0")
    assert "c0" in step(scheduler)  # the drained slot went to its waiter
    assert key_at(scheduler, reserved).startswith("t/c")
    assert owners(scheduler) == ["b1"]  # now t/b waits for a slot


def test_the_slot_reserved_is_the_one_that_drains_soonest(make):
    scheduler = make(num_slots=2)
    scheduler.add(request("long", "t/a", max_tokens=100))
    scheduler.add(request("short", "t/b", max_tokens=2))
    step(scheduler)
    scheduler.add(request("c0", "t/c"))
    step(scheduler)
    (index,) = scheduler.slots.reservations()
    assert key_at(scheduler, index).startswith("t/b")


def test_adapters_of_lower_rank_share_slot_memory_and_a_larger_one_reserves_a_whole_run(make):
    scheduler = make(num_slots=1, max_rank=16)  # two pages of rank 8
    scheduler.add(request("a0", "t/a", max_tokens=6))
    scheduler.add(request("b0", "t/b", max_tokens=2))
    assert sorted(step(scheduler)) == ["a0", "b0"]  # two rank-8 adapters side by side
    scheduler.add(request("c0", "t/c", rank=16))  # needs both pages: it reserves them
    step(scheduler)
    assert [(start, pages) for start, (_, pages) in scheduler.slots.reservations().items()] == [(0, 2)]
    scheduler.add(request("a1", "t/a"))  # hits on either page of the reserved run are held back: it drains
    scheduler.add(request("b1", "t/b"))
    assert not {"a1", "b1"} & set(step(scheduler))
    finish(scheduler, "b0")
    assert not {"a1", "b1", "c0"} & set(step(scheduler))  # a0 still runs on page 0
    finish(scheduler, "a0")
    assert "c0" in step(scheduler)
    assert scheduler.slots.resident() == {f"t/c@{'0' * 40}": 0}
    assert owners(scheduler) == ["a1"]  # next in line for the run


def test_a_free_slot_holding_a_wanted_adapter_is_reused_last(make):
    scheduler = make(num_slots=2, max_num_seqs=2)
    scheduler.add(request("a0", "t/a"))
    step(scheduler)
    scheduler.add(request("b0", "t/b"))
    step(scheduler)
    finish(scheduler, "a0", "b0")  # both slots free; t/b is the more recently used one
    scheduler.add(request("c0", "t/c"))
    scheduler.add(request("b1", "t/b"))
    assert sorted(step(scheduler)) == ["b1", "c0"]
    keys = sorted(key.split("@")[0] for key in scheduler.slots.resident())
    assert keys == ["t/b", "t/c"]  # t/a, least recently used but wanted by nobody, made room


def test_every_request_completes_when_adapters_outnumber_slots(make):
    scheduler = make(num_slots=2)
    names = [f"r{i}" for i in range(12)]
    for i, name in enumerate(names):
        scheduler.add(request(name, f"t/{'aab'[i % 3] if i % 4 else 'cdefgh'[i % 6]}", max_tokens=2))
    done: list[str] = []
    for _ in range(100):
        step(scheduler)
        ended = [r for r in scheduler.running if len(r.output_ids) >= r.params.max_tokens]
        for r in ended:
            scheduler.finish(r)
            done.append(r.request_id)
        if len(done) == len(names):
            break
    assert sorted(done) == sorted(names)
    assert scheduler.slots.stats()["slots_used"] == 0 and not scheduler.slots.reservations()


def test_a_claim_that_found_no_room_is_tried_again_only_once_something_was_freed(make):
    """With every slot pinned, a request for another adapter cannot get one: the scheduler does not ask the cache
    again each step (a claim walks every slot), only once a slot was unpinned, and then the request gets it."""
    scheduler = make(num_slots=1, max_rank=8)  # one page: one adapter at a time
    scheduler.add(request("a0", "t/a", max_tokens=50))
    assert step(scheduler) == ["a0"]
    claims = []
    claim = scheduler.slots.claim
    scheduler.slots.claim = lambda *args, **kwargs: claims.append(args[0]) or claim(*args, **kwargs)
    scheduler.add(request("b0", "t/b"))
    for _ in range(5):
        assert step(scheduler) == ["a0"]
    # tried once: the reservation it then made (a0's slot, to drain for it) excludes nothing more from its next claim
    assert len(claims) == 1
    finish(scheduler, "a0")  # its slot is unpinned
    assert step(scheduler) == ["b0"]
    assert len(claims) == 2 and key_at(scheduler, 0).startswith("t/b")


def test_waiting_requests_already_gone_through_are_skipped_until_something_changes(make):
    """With no room for any waiting request, a step goes only through requests that arrived since the last pass
    (the others' outcome stands until a slot is unpinned, loaded or freed, or a reservation is given up)."""
    scheduler = make(num_slots=1, max_rank=8)
    scheduler.add(request("a0", "t/a", max_tokens=50))
    assert step(scheduler) == ["a0"]
    looked = []  # the adapters of the requests gone through, in order
    slot_of = scheduler.slots.slot_of
    scheduler.slots.slot_of = lambda key: looked.append(key.split("@")[0]) or slot_of(key)
    for name in ("b0", "c0"):
        scheduler.add(request(name, f"t/{name}"))
    for _ in range(4):
        assert step(scheduler) == ["a0"]
    assert looked == ["t/b0", "t/c0"]  # one pass over b0 and c0, none after
    scheduler.add(request("d0", "t/d0"))
    assert step(scheduler) == ["a0"] and step(scheduler) == ["a0"]
    assert looked == ["t/b0", "t/c0", "t/d0"]  # d0's arrival: a pass over d0 only
    finish(scheduler, "a0")  # a slot unpinned: everyone is gone through again, and b0 gets it
    assert step(scheduler) == ["b0"]
    assert looked[3:6] == ["t/b0", "t/c0", "t/d0"]


def test_a_request_whose_adapter_left_slot_memory_before_it_was_read_goes_back_to_be_read(make):
    """A request looked up while its adapter was in slot memory carries no weights (nothing was read); if the
    adapter leaves slot memory before the request gets its slot, the request is handed back to be read, not stuck."""
    scheduler = make(num_slots=1)
    a = request("a", "t/a")
    scheduler.add(a)
    assert step(scheduler) == ["a"]
    scheduler.finish(a)
    b = request("b", "t/b")
    scheduler.add(b)  # claims the one slot: t/a leaves slot memory
    step(scheduler)
    later = request("later", "t/a")
    later.lora = None  # fetched while t/a was still in its slot
    scheduler.add(later)
    step(scheduler)
    assert scheduler.take_refetches() == [later] and scheduler.take_refetches() == []
    assert later.status.value == "resolving" and later not in scheduler.fair_order() and later.slot < 0
    later.lora = SimpleNamespace(max_rank=8)  # read now
    scheduler.finish(b)
    scheduler.add(later)
    assert step(scheduler) == ["later"] and later.slot >= 0
