"""Continuous batching: which requests run in the next step, and with how many tokens each.

Every step is one flat batch of at most `max_num_batched_tokens` tokens and `max_num_seqs` requests. Running
requests go first, oldest first: one token each when decoding, the next chunk of their prompt while prefilling
(chunked prefill: a long prompt is cut into budget-sized pieces, so it never stalls the decoding requests beside it).
What budget is left admits waiting requests. When a decoding request needs a KV block and none is free, the newest
running request is preempted: its blocks are freed and it is recomputed later from its tokens.

Adapter slots: a waiting request for an adapter is assigned a slot before it may run, a slot that already holds its
adapter or a reusable one that starts loading (off the step loop). When no slot can be had, that request becomes
the *slot waiter*: until it gets one, no other request newly pins a slot, so slots drain as their requests finish
and the waiter gets the next free one. This rotates adapters through the slots when more are wanted than there are
slots, and every request completes. Requests for the base model need no slot and are never held back by this.

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
        self, blocks: BlockManager, adapters: AdapterCache, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: dict[str, deque[Request]] = {}  # per tenant, FIFO
        self.running: list[Request] = []
        self.slot_waiter: Request | None = None
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
        if self.slot_waiter is request:
            self.slot_waiter = None
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
            if request not in self.running:  # preempted by an older request in this loop
                continue
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._make_room(request, request.num_computed + n):
                continue
            self.blocks.grow(request, request.num_computed + n)
            batch.append((request, n))
            budget -= n
        self._assign_slots()
        self._admit(batch, budget)
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

    def _assign_slots(self) -> None:
        for request in self.fair_order():
            if not request.needs_slot or request.adapter_key is None:
                continue
            if self.slot_waiter is not None and request is not self.slot_waiter:
                continue  # rotation: the slot waiter gets the next slot before anyone pins one
            index = self.adapters.slot_of(request.adapter_key)
            if index is not None:
                self.slot_hits += 1
            else:
                index = self.adapters.claim(request.adapter_key, request.lora)
                if index is None:
                    self.slot_waiter = request
                    continue
                self.slot_misses += 1
            self.adapters.pin(index)
            request.slot = index
            if self.slot_waiter is request:
                self.slot_waiter = None

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        for request in self.fair_order():
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            if request.adapter is not None and (request.slot < 0 or not self.adapters.is_ready(request.slot)):
                continue  # its adapter is still on its way to a slot
            if not self.blocks.can_grow(request, request.num_tokens):
                return  # first come first served for KV space: smaller requests do not overtake
            self.blocks.grow(request, request.num_tokens)
            self.waiting[request.tenant].remove(request)
            self._last_served[request.tenant] = next(self._served)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            n = min(request.num_tokens, budget)
            batch.append((request, n))
            budget -= n
