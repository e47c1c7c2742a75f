"""Continuous batching: which requests run in the next step, and with how many tokens each.

Every step is one flat batch of at most `max_num_batched_tokens` tokens and `max_num_seqs` requests. Running
requests go first, oldest first: one token each when decoding, the next chunk of their prompt while prefilling
(chunked prefill: a long prompt is cut into budget-sized pieces, so it never stalls the decoding requests beside it).
What budget is left admits waiting requests. When a decoding request needs a KV block and none is free, the newest
running request is preempted: its blocks are freed and it is recomputed later from its tokens.

Adapter slots: a waiting request for an adapter is assigned a slot before it may run, a slot that already holds its
adapter (a hit: any number of requests share it) or a reusable one, unpinned, that starts loading off the step loop;
a reusable slot whose adapter no waiting request wants goes first, then the least recently used. When no slot is
free, the request reserves the run of slot memory of its size whose pinned requests end soonest (at most
`max_reserved` runs are reserved at once, one per 16 slots): no new request pins a slot in a reserved run, so it
drains, and it goes to the request that reserved it. Hits on the other slots go on meanwhile: popular adapters keep
the batch full while rare ones rotate through the slots, and every request completes. Requests for the base model
need no slot and are never held back by this. A slot is a run of pages of slot memory sized by the adapter's rank
(`adapter_cache`): when no run of some size is free, requests needing that size or more wait while smaller adapters
may still find room. A claim that found no room is not tried again (a claim walks every slot) until a slot was
unpinned, loaded or freed, or a reservation given up. Optionally (`prefill_wave`), while requests decode, new ones are
admitted in groups, so that fewer steps carry a prefill.

Fairness across tenants: waiting requests are considered tenant by tenant, least recently served tenant first,
round-robin (each tenant's first request, then each one's second, ...), FIFO within a tenant. A tenant's burst
therefore delays another tenant's request by at most one admission per competing tenant, never indefinitely.
"""

from __future__ import annotations

import itertools
from collections import deque

from loramux.server.engine.adapter_cache import AdapterCache
from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, RequestStatus

ScheduledBatch = list[tuple[Request, int]]  # (request, number of its tokens computed this step)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: AdapterCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_wave: int = 1,
        max_prefill_delay: int = 0,
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_wave = prefill_wave  # while requests decode, admit at least this many at once ...
        self.max_prefill_delay = max_prefill_delay  # ... or whatever can be admitted after this many steps held
        self._held = 0  # steps that admissible requests have been held back for a wave
        self.waiting: dict[str, deque[Request]] = {}  # per tenant, FIFO
        self.running: list[Request] = []
        # first page of a run of slot memory -> the waiting request it drains for (pages: the run's length)
        self.reserved: dict[int, Request] = {}
        self._reserved_pages: dict[int, int] = {}
        self.max_reserved = max(1, adapters.layout.num_slots // 16)
        self._unreserved = 0  # reservations given up: pages a claim that found no room may take now
        # (adapter cache changes, reservations given up, pages) when a claim last found no run of that many pages:
        # until either count moves, a claim of that size or more fails again and is not tried
        self._no_room: tuple[int, int, int] | None = None
        self._owner_tried: dict[Request, tuple[int, int]] = {}  # the same, for a request that holds a reservation
        # Waiting requests that `_assign_slots` went through without giving them a slot, and the (adapter cache
        # changes, reservations given up) they were tried at: while neither count moves and no claim succeeds,
        # their outcome stands (no room, or their adapter's slot drains for another), and only newer requests are
        # gone through (with ~250 waiting, a pass over all of them took ~1 ms of a step's host time).
        self._tried: set[Request] = set()
        self._tried_at: tuple[int, int] | None = None
        self._served = itertools.count()
        self._last_served: dict[str, int] = {}
        self.slot_hits = self.slot_misses = self.preemptions = 0

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in list(self.waiting.values()))  # list(): stats() reads it from another thread

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
            self.adapters.unpin(request.slot)
            request.slot = -1
        for index in [i for i, r in self.reserved.items() if r is request]:
            self._unreserve(index)
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
        for request in sorted(self.running, key=lambda r: r.arrival):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted by an older request in this loop
                continue
            n = min(request.num_tokens - request.num_computed, budget)
            total = request.num_computed + n
            # a new block only when the step crosses into one (for a decoding request, one step in block_size)
            if self.blocks.blocks_for(total) > len(request.block_table):
                if not self._make_room(request, total):
                    continue
                self.blocks.grow(request, total)
            batch.append((request, n))
            budget -= n
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
        began = (self.adapters.freed, self._unreserved)
        if began != self._tried_at:
            self._tried = set()
        needing = [r for r in order if r.needs_slot and r.adapter_key is not None]
        waiting = [r for r in needing if r not in self._tried]
        if not waiting:
            return
        claimed = False
        wanted = {r.adapter_key for r in needing}  # a free slot holding one of these is reused last
        resident = self.adapters.resident()
        # pages of the smallest run a claim found no room for (outside reservations), in this step or in an earlier
        # one with nothing freed since
        no_room: int | None = None
        if self._no_room is not None and self._no_room[:2] == (self.adapters.freed, self._unreserved):
            no_room = self._no_room[2]
        for request in waiting:
            key = request.adapter_key
            owned = [i for i, r in self.reserved.items() if r is request]
            index = resident.get(key)
            if index is not None:
                if self._reserved_for_another(index, self.adapters.slots[index].pages, request):
                    continue  # its slot drains for another request; it gets a slot of its own later
                self.slot_hits += 1
            else:
                size = self.adapters.layout.pages_for(request.lora.max_rank)
                if not owned and no_room is not None and size >= no_room:
                    if len(self.reserved) < self.max_reserved:
                        self._reserve(request, size)
                    continue
                state = (self.adapters.freed, self._unreserved)
                if owned and self._owner_tried.get(request) == state:
                    continue  # its last claim found no room, and nothing was freed since
                taken = {
                    page
                    for start, r in self.reserved.items()
                    if r is not request
                    for page in range(start, start + self._reserved_pages[start])
                }
                index = self.adapters.claim(key, request.lora, exclude=taken, keep=wanted)
                if index is None:
                    no_room = size if no_room is None else min(no_room, size)
                    self._no_room = (*state, no_room)  # for requests without a reservation (they exclude more)
                    if owned:
                        self._owner_tried[request] = state
                    elif len(self.reserved) < self.max_reserved:
                        self._reserve(request, size)
                    continue
                self._owner_tried.pop(request, None)
                resident = {k: i for k, i in resident.items() if self.adapters.slots[i].key == k}  # less the evicted
                resident[key] = index
                self.slot_misses += 1
                claimed = True
            for i in owned:
                self._unreserve(i)
            self.adapters.pin(index)
            request.slot = index
            request.lora = None  # in the slot (or on its way): the CPU copy may leave the cache's arena
        if claimed or (self.adapters.freed, self._unreserved) != began:
            # an adapter became resident, or pages were freed or given up, during the pass: a request gone through
            # before that may fare otherwise now
            self._tried, self._tried_at = set(), None
        else:
            self._tried.update(r for r in waiting if r.needs_slot)
            self._tried_at = began

    def _reserved_for_another(self, start: int, pages: int, request: Request) -> bool:
        """Whether pages start .. start + pages - 1 overlap a run reserved for a request other than `request`."""
        return any(
            r is not request and begin < start + pages and start < begin + self._reserved_pages[begin]
            for begin, r in self.reserved.items()
        )

    def _reserve(self, request: Request, pages: int) -> None:
        """Reserve for `request` the run of `pages` pages (aligned to its length, as slots are) whose pinned
        requests all end soonest (tokens left), among the runs no other request has reserved."""
        left: dict[int, int] = {}  # run -> tokens left of its longest pinned request
        for other in itertools.chain(self.running, *self.waiting.values()):
            if other.slot >= 0:
                to_go = len(other.prompt_ids) + other.params.max_tokens - other.num_computed
                slot_pages = max(1, self.adapters.slots[other.slot].pages)
                for run in range(other.slot // pages, (other.slot + slot_pages - 1) // pages + 1):
                    left[run] = max(left.get(run, 0), to_go)
        free = [run for run in left if not self._reserved_for_another(run * pages, pages, request)]
        if free:
            start = min(free, key=left.__getitem__) * pages
            self.reserved[start] = request
            self._reserved_pages[start] = pages

    def _unreserve(self, start: int) -> None:
        self._unreserved += 1
        del self.reserved[start]
        del self._reserved_pages[start]

    def _admit(self, order: list[Request], batch: ScheduledBatch, budget: int) -> None:
        admitted: ScheduledBatch = []  # (request, its prompt tokens computed this step)
        free, seqs = self.blocks.num_free, len(self.running)
        for request in order:
            if budget == 0 or seqs >= self.max_num_seqs:
                break
            if request.adapter is not None and (request.slot < 0 or not self.adapters.is_ready(request.slot)):
                continue  # its adapter is still on its way to a slot
            need = self.blocks.blocks_for(request.num_tokens) - len(request.block_table)
            if need > free:
                break  # first come first served for KV space: smaller requests do not overtake
            n = min(request.num_tokens, budget)
            admitted.append((request, n))
            free, seqs, budget = free - need, seqs + 1, budget - n
        if not admitted:
            self._held = 0
            return
        if self.running and len(admitted) < self.prefill_wave and self._held < self.max_prefill_delay:
            self._held += 1  # decoding goes on; these join with the next wave
            return
        self._held = 0
        for request, n in admitted:
            self.blocks.grow(request, request.num_tokens)
            self.waiting[request.tenant].remove(request)
            self._last_served[request.tenant] = next(self._served)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.append((request, n))
