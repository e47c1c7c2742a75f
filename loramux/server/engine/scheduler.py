"""Continuous batching: which requests run in the next step, and with how many tokens each.

Every step is one flat batch of at most `max_num_batched_tokens` tokens and `max_num_seqs` requests. Running
requests go first, oldest first: one token each when decoding, the next chunk of their prompt while prefilling
(chunked prefill: a long prompt is cut into budget-sized pieces, so it never stalls the decoding requests beside it).
What budget is left admits waiting requests. When a decoding request needs a KV block and none is free, the newest
running request is preempted: its blocks are freed and it is recomputed later from its tokens.

Adapter slots (`adapter_slots.AdapterSlots`, which the scheduler asks): a waiting request for an adapter is assigned
a slot before it may run, a slot that already holds its adapter (a hit: any number of requests share it) or a
reusable one, unpinned, whose write the step loop queues beside the next forward; a reusable slot whose adapter no
waiting request wants goes first, then the least recently used. When no slot is free, the request reserves the run
of slot memory of its size whose pinned requests end soonest (at most one run per 16 slots is reserved at once): no
new request pins a slot in a reserved run, so it drains, and it goes to the request that reserved it. Hits on the
other slots go on meanwhile: popular adapters keep the batch full while rare ones rotate through the slots, and
every request completes. Requests for the base model need no slot and are never held back by this. A slot is a run
of pages of slot memory sized by the adapter's rank: when no run of some size is free, requests needing that size or
more wait while smaller adapters may still find room. A claim that found no room is not tried again (a claim walks
every slot) until a slot was unpinned, loaded or freed, or a reservation given up.

Fairness across tenants: waiting requests are considered tenant by tenant, least recently served tenant first,
round-robin (each tenant's first request, then each one's second, ...), FIFO within a tenant. A tenant's burst
therefore delays another tenant's request by at most one admission per competing tenant, never indefinitely.
"""

from __future__ import annotations

import itertools
from collections import deque

from loramux.server.engine.adapter_slots import AdapterSlots
from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, RequestStatus

ScheduledBatch = list[tuple[Request, int]]  # (request, number of its tokens computed this step)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        slots: AdapterSlots,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.blocks = blocks
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: dict[str, deque[Request]] = {}  # per tenant, FIFO
        self.running: list[Request] = []
        # of the batch scheduled last: tokens of prompt chunks (and of a preempted request's tokens computed again),
        # and sequences computing the one token they generated last (decode tokens)
        self.prompt_tokens = self.decode_tokens = 0
        # (slot changes, pages) when a claim last found no run of that many pages: until `slots.changes` moves, a
        # claim of that size or more fails again and is not tried
        self._no_room: tuple[int, int] | None = None
        self._owner_tried: dict[Request, int] = {}  # the same, for a request that holds a reservation
        # Waiting requests that `_assign_slots` went through without giving them a slot, and the slot changes they
        # were tried at: while that count stands and no claim succeeds, their outcome stands (no room, or their
        # adapter's slot drains for another), and only newer requests are gone through (with ~250 waiting, a pass
        # over all of them took ~1 ms of a step's host time).
        self._tried: set[Request] = set()
        self._tried_at: int | None = None
        self._served = itertools.count()
        self._last_served: dict[str, int] = {}
        self.slot_hits = self.slot_misses = self.preemptions = 0
        self._refetches: list[Request] = []  # see `take_refetches`

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.setdefault(request.tenant, deque()).append(request)

    def finish(self, request: Request) -> None:
        """Take `request` out of the scheduler, freeing its KV blocks and its slot pin at once."""
        if request in self.running:
            self.running.remove(request)
        queue = self.waiting.get(request.tenant)
        if queue is not None and request in queue:
            queue.remove(request)
        self.blocks.free(request)
        if request.slot >= 0:
            self.slots.unpin(request.slot)
            request.slot = -1
        self.slots.unreserve(request)
        self._owner_tried.pop(request, None)
        request.status = RequestStatus.FINISHED

    def fair_order(self) -> list[Request]:
        """Waiting requests, least recently served tenant first, interleaved round-robin, FIFO within a tenant."""
        tenants = sorted((t for t, q in self.waiting.items() if q), key=lambda t: self._last_served.get(t, -1))
        queues = [self.waiting[t] for t in tenants]
        order = []
        for i in range(max((len(q) for q in queues), default=0)):
            order.extend(q[i] for q in queues if i < len(q))
        return order

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch: ScheduledBatch = []
        self.prompt_tokens = self.decode_tokens = 0
        for request in sorted(self.running, key=lambda r: r.arrival):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted by an older request in this loop
                continue
            remaining = request.num_tokens - request.num_computed
            n = min(remaining, budget)
            total = request.num_computed + n
            # a new block only when the step crosses into one (for a decoding request, one step in block_size)
            if self.blocks.blocks_for(total) > len(request.block_table):
                if not self._make_room(request, total):
                    continue
                self.blocks.grow(request, total)
            batch.append((request, n))
            budget -= n
            if remaining == 1 and request.num_tokens > len(request.prompt_ids):
                self.decode_tokens += 1
            else:
                self.prompt_tokens += n
        if self.num_waiting:
            order = self.fair_order()  # once: assigning slots leaves the queues as they are
            self._assign_slots(order)
            self._admit(order, batch, budget)
        return batch

    def _make_room(self, request: Request, num_tokens: int) -> bool:
        """Preempt the newest running requests until `request` fits; False if it was itself preempted."""
        while not self.blocks.can_grow(request, num_tokens):
            victim = max(self.running, key=lambda r: r.arrival)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        # Recompute later: its prompt and the tokens generated so far become the prefill of its next turn.
        self.running.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.WAITING
        self.waiting.setdefault(request.tenant, deque()).appendleft(request)
        self.preemptions += 1

    def _assign_slots(self, order: list[Request]) -> None:
        began = self.slots.changes
        if began != self._tried_at:
            self._tried = set()
        needing = [r for r in order if r.needs_slot and r.adapter_key is not None]
        waiting = [r for r in needing if r not in self._tried]
        if not waiting:
            return
        claimed = False
        wanted = {r.adapter_key for r in needing}  # a free slot holding one of these is reused last
        # pages of the smallest run a claim found no room for (outside reservations), in this step or in an earlier
        # one with nothing freed since
        no_room = self._no_room[1] if self._no_room is not None and self._no_room[0] == began else None
        for request in waiting:
            index = self.slots.slot_of(request.adapter_key)  # type: ignore[arg-type]
            if index is not None:
                if self.slots.reserved_for_another(index, request):
                    continue  # its slot drains for another request; it gets a slot of its own later
                self.slot_hits += 1
            elif request.lora is None:
                # Its adapter was in slot memory when it was looked up, so it was not read; it has left since: the
                # engine reads it now (`take_refetches`), and the request waits again once it is read.
                self._leave_queue(request)
                request.status = RequestStatus.RESOLVING
                self._refetches.append(request)
                continue
            else:
                index, no_room = self._claim(request, wanted, no_room)
                if index is None:
                    continue
                claimed = True
            self.slots.unreserve(request)
            self.slots.pin(index)
            request.slot = index
            request.lora = None  # in the slot (or on its way): the CPU copy may leave the cache's arena
        if claimed or self.slots.changes != began:
            # an adapter became resident, or pages were freed or given up, during the pass: a request gone through
            # before that may fare otherwise now
            self._tried, self._tried_at = set(), None
        else:
            self._tried.update(r for r in waiting if r.needs_slot)
            self._tried_at = began

    def _leave_queue(self, request: Request) -> None:
        """Take a waiting request (no blocks, no slot) out of the queue and of its reservation."""
        queue = self.waiting.get(request.tenant)
        if queue is not None and request in queue:
            queue.remove(request)
        self.slots.unreserve(request)
        self._owner_tried.pop(request, None)

    def take_refetches(self) -> list[Request]:
        """The requests whose adapters must be read after all (they left slot memory before these got a slot)."""
        refetches, self._refetches = self._refetches, []
        return refetches

    def _claim(self, request: Request, wanted: set[str | None], no_room: int | None) -> tuple[int | None, int | None]:
        """Claim a slot for `request`'s adapter -> (the slot or None, the pass's `no_room` as it stands now). A
        request that finds no room reserves a run where it may; one that holds a reservation tries again only once
        something changed."""
        assert request.lora is not None and request.adapter_key is not None
        size = self.slots.pages_for(request.lora.max_rank)
        owns = self.slots.holds_reservation(request)
        if not owns and no_room is not None and size >= no_room:
            self._reserve(request, size)
            return None, no_room
        state = self.slots.changes
        if owns and self._owner_tried.get(request) == state:
            return None, no_room  # its last claim found no room, and nothing was freed since
        index = self.slots.claim(request.adapter_key, request.lora, owner=request, keep=wanted)
        if index is None:
            no_room = size if no_room is None else min(no_room, size)
            self._no_room = (state, no_room)  # for requests without a reservation (they are kept out of more runs)
            if owns:
                self._owner_tried[request] = state
            else:
                self._reserve(request, size)
            return None, no_room
        self._owner_tried.pop(request, None)
        self.slot_misses += 1
        return index, no_room

    def _reserve(self, request: Request, pages: int) -> None:
        """Reserve for `request` a run of `pages` pages, the one whose pinned requests all end soonest (tokens
        left), where the slots allow one more reservation."""
        if not self.slots.may_reserve:
            return
        ends: dict[int, int] = {}  # slot -> tokens left of its longest pinned request
        for other in itertools.chain(self.running, *self.waiting.values()):
            if other.slot >= 0:
                to_go = len(other.prompt_ids) + other.params.max_tokens - other.num_computed
                ends[other.slot] = max(ends.get(other.slot, 0), to_go)
        self.slots.reserve(request, pages, ends)

    def _admit(self, order: list[Request], batch: ScheduledBatch, budget: int) -> None:
        admitted: ScheduledBatch = []  # (request, its prompt tokens computed this step)
        free, seqs = self.blocks.num_free, len(self.running)
        for request in order:
            if budget == 0 or seqs >= self.max_num_seqs:
                break
            if request.adapter is not None and (request.slot < 0 or not self.slots.is_ready(request.slot)):
                continue  # its adapter is still on its way to a slot
            need = self.blocks.blocks_for(request.num_tokens) - len(request.block_table)
            if need > free:
                break  # first come first served for KV space: smaller requests do not overtake
            n = min(request.num_tokens, budget)
            admitted.append((request, n))
            free, seqs, budget = free - need, seqs + 1, budget - n
        for request, n in admitted:
            self.blocks.grow(request, request.num_tokens)
            self.waiting[request.tenant].remove(request)
            self._last_served[request.tenant] = next(self._served)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.append((request, n))
            self.prompt_tokens += n
