"""Adapter tiers: GPU slot memory (allocated at start, paged by rank), a CPU cache bounded in bytes (LRU), the source.

`fetch` (on a pool of fetch threads: several adapters are read at once, each only once) resolves a name for a tenant
to an exact revision and reads it into the CPU cache, in the slots' dtype, as one buffer carved from a host arena
(page-locked on a GPU, allocated once at start; `host_arena`). With `reader_processes` (the engine's default on a
GPU) each read runs in a reader process that writes into the shared arena (`adapter_reader`), so the step loop's
kernel launches never wait for the GIL behind a read; without, on the fetch thread itself, whose reads release the
GIL (`load_lora`). `claim` puts a cached adapter into a free slot: with `issue_write` (the engine's default) the step
loop queues the write itself once its step's forward is queued, and marks the slot ready once the copies are seen
done; without, on the loader thread (one write at a time). Either way the step loop never waits for a disk read or a
host-to-device copy, and a slow read never holds up a slot write. A write waits only for the device work queued
before its claim (`fence`), the only work that may still read the slot's previous adapters, not for the steps queued
since. A slot holds pins (requests that will run on it); only an unpinned slot is ever reused. A new revision of a
repo replaces the old one: the old one leaves the CPU cache at once and its slot is the first to be reused once its
last request ends.

Slots are runs of pages of the slot memory (`slots.SlotLayout`): an adapter takes the power of two of pages its rank
needs, aligned to that size (a buddy layout, so a run never straddles two runs of its size), and its slot index is
its first page. `claim` takes the best aligned run whose adapters may all leave: an empty one first, then one whose
adapters are stale, not wanted by waiting requests, and least recently used.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.adapters.source import AdapterRef, AdapterSource
from loramux.adapters.weights import LoraWeights, load_lora
from loramux.server.engine.adapter_reader import ReaderPool
from loramux.server.engine.errors import AdapterTooLargeError
from loramux.server.engine.host_arena import HostArena
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.config import ModelConfig

log = logging.getLogger(__name__)

# Adapters read from the source at once. Two: on an H100 host with 16 cores, two readers read 128 adapters/s and
# slowed a loop of kernel launches on the step thread 2.6x; four read 77/s and slowed it 3.6x (the readers and the
# step loop contend for the GIL between their torch calls).
FETCH_THREADS = 2
FETCH_CPU_THREADS_ON_GPU = 1  # CPU threads each fetch thread's torch calls use when the engine runs on a GPU


@dataclass
class Slot:
    """The state of a run of pages, kept at its first page (a page inside a run, or free, has the default)."""

    key: str | None = None  # repo@commit it holds (or is loading)
    ready: bool = False  # False while loading
    pins: int = 0  # requests assigned to it that have not finished
    last_used: int = 0
    stale: bool = False  # a newer revision of its repo exists
    pages: int = 0  # pages of the run
    failed: bool = False  # its write failed: held (not ready) until `failed_writes` hands it over, then freed


class AdapterCache:
    def __init__(
        self,
        source: AdapterSource | None,
        base_config: ModelConfig,
        write_slot: Callable[[int, LoraWeights | None, object], None],
        num_slots: int,
        max_rank: int,
        cpu_cache_bytes: int,
        on_change: Callable[[], None] = lambda: None,
        dtype: torch.dtype = torch.float32,
        arena: HostArena | None = None,
        page_rank: int | None = None,
        fetch_cpu_threads: int | None = None,
        b_rank_major: bool = True,
        fence: Callable[[], object] = lambda: None,
        reader_processes: int = 0,
        issue_write: Callable[[int, LoraWeights | None, object], object | None] | None = None,
    ) -> None:
        """`write_slot(slot, weights, after)` loads an adapter into a slot on the loader thread; `after` is what
        `fence()` returned on the thread that claimed the slot (the step loop), when it claimed it: the write must
        wait for the work queued until then (steps that may read the slot's previous adapters), and need not wait
        for anything queued since (no step uses a slot before it is ready). `reader_processes` (> 0, with a shared
        `arena`): reads run in that many reader processes, handed out by as many fetch threads.

        With `issue_write(slot, weights, after)` (it queues the write and returns what it completes at, with a
        `query()` and a `synchronize()`, or None once done) there is no loader thread: the claiming thread queues its
        claims' writes itself when it calls `issue_writes`, and marks their slots ready in `complete_writes`."""
        self.source = source
        self.base_config = base_config
        self.write_slot = write_slot
        self.fence = fence
        self.layout = SlotLayout.of(num_slots, max_rank, page_rank)  # as the model's slot memory is allocated
        self.cpu_cache_bytes = cpu_cache_bytes
        self.on_change = on_change  # wakes the step loop when a load finished
        self.dtype = dtype  # the CPU cache keeps adapters in the slots' dtype ...
        self.arena = arena  # ... carved from this arena (page-locked, on a GPU) where it has room
        self.b_rank_major = b_rank_major  # ... with B turned rank-major when read, or as the file holds it
        self.slots = [Slot() for _ in range(self.layout.pages)]  # by page; a run's state at its first page
        self._run_of = [-1] * self.layout.pages  # page -> first page of the slot holding it, -1 = free
        self._heads: set[int] = set()  # first pages of the slots in use
        self._cpu: OrderedDict[str, LoraWeights] = OrderedDict()
        self._latest: dict[str, str] = {}  # repo -> newest commit seen
        self._lock = threading.Lock()
        # Reads from the source run side by side (several adapters load at once); slot writes run one at a time on
        # a thread of their own, so that a slow read never delays an adapter already in the CPU cache.
        # CPU threads each fetch thread's torch calls (the finiteness check; B turned rank-major where `b_rank_major`)
        # may use; None: torch's default, every core. Read once, when a fetch thread starts.
        self.fetch_cpu_threads = fetch_cpu_threads
        self.readers: ReaderPool | None = None
        if reader_processes > 0 and arena is not None and arena.fd is not None:
            try:
                self.readers = ReaderPool(reader_processes, arena, base_config, dtype, b_rank_major, fetch_cpu_threads)
            except OSError as exc:  # no process could be started: the fetch threads read instead
                log.warning("adapter reader processes could not start (%s); reading in-process", exc)
        self._fetcher = ThreadPoolExecutor(
            max_workers=reader_processes if self.readers is not None else FETCH_THREADS,
            thread_name_prefix="loramux-adapter-fetch",
            initializer=self._start_fetch_thread,
        )
        self.issue_write = issue_write
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-adapter-loader")
        # with `issue_write`: claims whose writes are not queued yet, and the writes queued and not seen complete
        self._to_write: list[tuple[int, str, LoraWeights, object]] = []
        self._writing: list[tuple[int, str, LoraWeights, object]] = []
        self._failed: list[tuple[int, str, Exception]] = []  # writes that failed, for `failed_writes`
        self._reading: dict[str, threading.Lock] = {}  # key -> held while it is read, so each is read once
        self._tick = 0
        # Counts the changes that may let a claim that found no room succeed (a slot unpinned, loaded or freed):
        # while it stands still, a claim that failed fails again (`Scheduler` skips it).
        self.freed = 0
        self.hits = self.misses = self.loads = self.slot_loads = self.outside_arena = self.write_failures = 0
        # reads from the source; slot writes on the thread that made them (a loader thread: until the copies were
        # done; the step loop with `issue_write`: the host time it spent queuing them)
        self.read_seconds = self.write_seconds = 0.0

    # -- loader-thread side ------------------------------------------------------------------------------------

    def _start_fetch_thread(self) -> None:
        if self.fetch_cpu_threads is not None:
            # Sets this thread's count, and the default of every thread whose first parallel torch call comes later
            # (a step loop thread started since, say: on a GPU its torch calls launch kernels, needing no CPU threads).
            # Threads that made one already keep theirs.
            torch.set_num_threads(self.fetch_cpu_threads)

    def fetch_async(self, ref: AdapterRef, tenant: str | None) -> Future[tuple[str, LoraWeights]]:
        return self._fetcher.submit(self.fetch, ref, tenant)

    def fetch(self, ref: AdapterRef, tenant: str | None) -> tuple[str, LoraWeights]:
        """Resolve `ref` for `tenant` and return (repo@commit, weights), from the CPU cache or read from disk.

        Raises AdapterNotFoundError, or AdapterConfigError (subclasses) for an adapter that does not fit.
        """
        if self.source is None:
            from loramux.adapters.source import AdapterNotFoundError

            raise AdapterNotFoundError(f"adapter {ref} not found: this engine serves the base model only")
        resolved = self.source.resolve(ref, tenant)
        key = resolved.key
        with self._lock:
            self._note_revision(resolved.repo, resolved.commit)
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:  # a second request for an adapter being read waits for that read
            try:
                return self._fetch_resolved(resolved.path, key, resolved.repo)
            finally:
                with self._lock:
                    self._reading.pop(key, None)

    def _fetch_resolved(self, path: Path, key: str, repo: str) -> tuple[str, LoraWeights]:
        with self._lock:
            weights = self._cpu.get(key)
            if weights is not None:
                self._cpu.move_to_end(key)
                self.hits += 1
                return key, weights
            self.misses += 1
        started = time.perf_counter()
        regions: list[int] = []  # the arena offset the weights were read into, if any

        def allocate(nbytes: int) -> tuple[int | None, torch.Tensor]:
            offset, region = self._allocate(nbytes)
            if offset is not None:
                regions.append(offset)
            return offset, region

        try:
            if self.readers is not None:
                weights = self.readers.read(path, allocate)
            else:
                weights = load_lora(
                    path, self.base_config, self.dtype, lambda n: allocate(n)[1], b_rank_major=self.b_rank_major
                )
        except BaseException:
            for offset in regions:
                self.arena.free(offset)
            raise
        for offset in regions:  # back to the arena once nothing (cache, request, slot write) holds the weights
            weakref.finalize(weights, self.arena.free, offset)
        if weights.max_rank > self.layout.max_rank:
            raise AdapterTooLargeError(
                f"adapter {repo} has rank {weights.max_rank}; this server serves ranks up to {self.layout.max_rank}"
            )
        elapsed = time.perf_counter() - started
        with self._lock:
            self.loads += 1
            self.read_seconds += elapsed
            self._cpu[key] = weights
            self._evict_cpu()
        log.info("read adapter %s from disk in %.3fs", key, elapsed)
        return key, weights

    def _note_revision(self, repo: str, commit: str) -> None:
        if self._latest.get(repo, commit) != commit:
            prefix = f"{repo}@"
            for key in [k for k in self._cpu if k.startswith(prefix) and k != f"{repo}@{commit}"]:
                del self._cpu[key]
            for slot in self.slots:
                if slot.key is not None and slot.key.startswith(prefix) and slot.key != f"{repo}@{commit}":
                    slot.stale = True
        self._latest[repo] = commit

    def _allocate(self, nbytes: int) -> tuple[int | None, torch.Tensor]:
        """A buffer for an adapter being read: a region of the arena, evicting the least recently used adapters
        until one fits; a plain (pageable) tensor when there is no arena or nothing more to evict."""
        if self.arena is not None and nbytes <= self.arena.capacity:
            while True:
                found = self.arena.allocate(nbytes)
                if found is not None:
                    return found
                with self._lock:
                    if not self._cpu:
                        break
                    self._cpu.popitem(last=False)  # its region is freed now, or when its last holder lets go
            with self._lock:
                self.outside_arena += 1
        return None, torch.empty(nbytes, dtype=torch.uint8)

    def _evict_cpu(self) -> None:
        total = sum(w.nbytes() for w in self._cpu.values())
        while total > self.cpu_cache_bytes and len(self._cpu) > 1:
            _, weights = self._cpu.popitem(last=False)
            total -= weights.nbytes()

    def _load_into_slot(self, index: int, key: str, weights: LoraWeights, after: object) -> None:
        started = time.perf_counter()
        try:
            self.write_slot(index, weights, after)
        except Exception as exc:
            self._write_failed(index, key, exc)
            self.on_change()
            raise
        self.write_seconds += time.perf_counter() - started
        self._loaded(index, key)
        self.on_change()

    def _write_failed(self, index: int, key: str, exc: Exception) -> None:
        """Hold slot `index` as failed until the step loop takes the failure (`failed_writes`): requests pinned to it
        meanwhile are ended with the others, and no claim takes its pages before then."""
        log.exception("writing adapter %s into slot %d failed", key, index)  # called where `exc` is handled
        with self._lock:
            self.write_failures += 1
            if self.slots[index].key == key:
                self.slots[index].failed = True
                self._failed.append((index, key, exc))

    def failed_writes(self) -> list[tuple[int, str, Exception]]:
        """The slot writes that failed since the last call, (slot, key, error), their slots freed now: the caller
        ends the requests pinned to those slots (their adapter is not there, and their pins went with the slot)."""
        with self._lock:
            failed, self._failed = self._failed, []
            for index, key, _ in failed:
                if self.slots[index].key == key and self.slots[index].failed:
                    self._release(index)
        return failed

    def _loaded(self, index: int, key: str) -> None:
        """Mark slot `index` ready once `key`'s write is done (unless the slot was given to another adapter since)."""
        with self._lock:
            slot = self.slots[index]
            if slot.key == key:
                slot.ready = True
            self.freed += 1
            self.slot_loads += 1

    # -- step-loop side ----------------------------------------------------------------------------------------

    def resident(self) -> dict[str, int]:
        """{key: slot} of every slot holding (or loading) a current revision."""
        with self._lock:
            return {slot.key: i for i, slot in enumerate(self.slots) if slot.key is not None and not slot.stale}

    def is_ready(self, index: int) -> bool:
        with self._lock:
            return self.slots[index].ready

    def claim(
        self, key: str, weights: LoraWeights, exclude: Collection[int] = (), keep: Collection[str] = ()
    ) -> int | None:
        """Start loading `key` into a run of pages its rank needs, holding no page of `exclude`, and return the slot
        (its first page); None if no such run is free or may be emptied (every adapter in it unpinned, loaded).

        Preference: an empty run, then one whose adapters are stale revisions, then one holding no adapter in `keep`
        (adapters that waiting requests want), then the one whose adapters were used least recently, then fewest.
        """
        size = self.layout.pages_for(weights.max_rank)
        with self._lock:
            # Runs are aligned to their size, so a slot lies inside a candidate run of `size` pages or covers it:
            # one pass over the slots gives every candidate's occupants (runs with none are empty).
            occupied: dict[int, list] = {}  # candidate -> [blocked, any fresh, any kept, latest use, count]
            for page in exclude:  # reserved pages: no candidate may take them
                occupied.setdefault(page // size, [False, False, False, 0, 0])[0] = True
            for head in self._heads:
                slot = self.slots[head]
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
            runs = len(self.slots) // size
            if len(occupied) < runs:
                index = next(run for run in range(runs) if run not in occupied) * size
            else:
                candidates = [(tuple(state[1:]), run) for run, state in occupied.items() if not state[0]]
                if not candidates:
                    return None
                index = min(candidates)[1] * size
                for head in {self._run_of[p] for p in range(index, index + size)}:
                    self._release(head)
            self.slots[index] = Slot(key=key, ready=False, pages=size)
            self._run_of[index : index + size] = [index] * size
            self._heads.add(index)
        if self.issue_write is not None:
            self._to_write.append((index, key, weights, self.fence()))
        else:
            self._loader.submit(self._load_into_slot, index, key, weights, self.fence())
        return index

    def issue_writes(self) -> int:
        """Queue the slot writes of the claims made since the last call (with `issue_write`; on the claiming thread,
        the step loop: it calls this once a step's forward is queued, so the copies run beside that step) -> how
        many. A write that fails is held for `failed_writes`, as on the loader thread."""
        issued, self._to_write = self._to_write, []
        for index, key, weights, after in issued:
            started = time.perf_counter()
            try:
                done = self.issue_write(index, weights, after)  # type: ignore[misc]
            except Exception as exc:
                self._write_failed(index, key, exc)
                continue
            finally:
                self.write_seconds += time.perf_counter() - started  # the host time it cost this thread
            self._writing.append((index, key, weights, done))  # the weights kept until the copies are done
        if issued:
            self.complete_writes()  # those done already (on the CPU, all)
        return len(issued)

    def complete_writes(self, wait: bool = False) -> int:
        """Mark ready the slots whose queued writes are done (with `wait`, after waiting for all of them) -> how
        many writes are still under way."""
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
        """Claims whose slot writes are not queued yet or not seen complete (with `issue_write`)."""
        return len(self._to_write) + len(self._writing)

    def _release(self, index: int) -> None:
        """Free the slot starting at page `index` (under the lock)."""
        pages = max(1, self.slots[index].pages)
        self.freed += 1
        self._run_of[index : index + pages] = [-1] * pages
        self.slots[index] = Slot()
        self._heads.discard(index)

    def pin(self, index: int) -> None:
        with self._lock:
            self._tick += 1
            self.slots[index].pins += 1
            self.slots[index].last_used = self._tick

    def unpin(self, index: int) -> None:
        with self._lock:
            self.slots[index].pins -= 1
            self.freed += 1

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "slots_total": self.layout.num_slots,  # slots of the highest rank the memory holds
                "slots_used": sum(1 for s in self.slots if s.pins > 0),  # adapters that requests hold
                "slots_loaded": sum(1 for s in self.slots if s.ready),  # adapters resident
                "slot_pages_total": self.layout.pages,
                "slot_pages_used": sum(s.pages for s in self.slots if s.key is not None),
                "adapter_cache_hits": self.hits,
                "adapter_cache_misses": self.misses,
                "adapter_cache_entries": len(self._cpu),
                "adapter_cache_bytes": sum(w.nbytes() for w in self._cpu.values()),
                "adapter_loads": self.loads,
                "adapter_slot_loads": self.slot_loads,
                "adapter_load_seconds": self.read_seconds + self.write_seconds,
                "adapter_read_seconds": self.read_seconds,
                "adapter_slot_write_seconds": self.write_seconds,
                "adapter_slot_write_failures": self.write_failures,
                "adapter_loads_outside_arena": self.outside_arena,
                "adapter_reader_processes": self.readers.processes if self.readers is not None else 0,
                "adapter_reader_restarts": self.readers.restarts if self.readers is not None else 0,
            }

    def wait_ready(self) -> None:
        """Wait until the reader processes (if any) have started; see `ReaderPool.wait_ready`."""
        if self.readers is not None:
            self.readers.wait_ready()

    def shutdown(self) -> None:
        self._fetcher.shutdown(wait=True, cancel_futures=True)
        self._loader.shutdown(wait=True, cancel_futures=True)
        if self.readers is not None:
            self.readers.close()
