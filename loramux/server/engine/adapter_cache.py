"""The CPU tier of adapters: a cache bounded in bytes (LRU) over the adapter source, filled by fetch threads.

`fetch` (on a pool of fetch threads: several adapters are read at once, each only once) resolves a name for a tenant
to an exact revision and reads it into the CPU cache, in the slots' dtype, as one buffer carved from a host arena
(page-locked on a GPU, allocated once at start; `host_arena`). With `reader_processes` (the engine's default on a
GPU) each read runs in a reader process that writes into the shared arena (`adapter_reader`), so the step loop's
kernel launches never wait for the GIL behind a read; without, on the fetch thread itself, whose reads release the
GIL (`load_lora`). Either way the step loop never waits for a disk read. A new revision of a repo replaces the old
one: the old one leaves the CPU cache at once, and `on_new_revision` passes the news on (the engine hands it to
`AdapterSlots.retire` on the step loop). Where an adapter goes on the device is `adapter_slots`' business.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from loramux.core.adapter_source import AdapterRef, AdapterSource
from loramux.server.engine.adapter_reader import ReaderPool, ReadSpec
from loramux.server.engine.errors import AdapterTooLargeError
from loramux.server.engine.host_arena import HostArena
from loramux.server.models.lora_weights import LoraWeights

log = logging.getLogger(__name__)

# Adapters read at once by fetch threads reading in this process (without reader processes). Two: on an H100 host
# with 16 cores, two readers read 128 adapters/s and slowed a loop of kernel launches on the step thread 2.6x; four
# read 77/s and slowed it 3.6x (the readers and the step loop contend for the GIL between their torch calls).
_READS_AT_ONCE = 2
FETCH_CPU_THREADS_ON_GPU = 1  # CPU threads each fetch thread's torch calls use when the engine runs on a GPU


class AdapterCache:
    def __init__(
        self,
        source: AdapterSource | None,
        spec: ReadSpec,
        max_rank: int,
        cpu_cache_bytes: int,
        arena: HostArena | None = None,
        reader_processes: int = 0,
        on_new_revision: Callable[[str, str], None] = lambda repo, commit: None,
    ) -> None:
        """Adapters are read as `spec` says, refused above `max_rank` (the slots' rank), and kept up to
        `cpu_cache_bytes`, carved from `arena` where it has room. `reader_processes` (> 0, with a shared `arena`):
        reads run in that many reader processes, handed out by as many fetch threads. `on_new_revision(repo,
        commit)`: called on a fetch thread, under the cache's lock (it must not call back into the cache), when
        `commit` replaces another revision of `repo`."""
        self.source = source
        self.spec = spec
        self.max_rank = max_rank
        self.cpu_cache_bytes = cpu_cache_bytes
        self.arena = arena
        self.on_new_revision = on_new_revision
        self._cpu: OrderedDict[str, LoraWeights] = OrderedDict()
        self._latest: dict[str, str] = {}  # repo -> newest commit seen
        self._lock = threading.Lock()
        self.readers: ReaderPool | None = None
        if reader_processes > 0 and arena is not None and arena.fd is not None:
            try:
                self.readers = ReaderPool(reader_processes, arena, spec)
            except OSError as exc:  # no process could be started: the fetch threads read instead
                log.warning("adapter reader processes could not start (%s); reading in-process", exc)
        self._fetcher = ThreadPoolExecutor(  # reads run side by side: several adapters load at once
            max_workers=reader_processes if self.readers is not None else _READS_AT_ONCE,
            thread_name_prefix="loramux-adapter-fetch",
            initializer=self._start_fetch_thread,
        )
        self._reading: dict[str, threading.Lock] = {}  # key -> held while it is read, so each is read once
        self.hits = self.misses = self.loads = self.outside_arena = 0
        self.slot_only = 0  # fetches that read nothing: the revision was in slot memory
        self.read_seconds = 0.0

    def _start_fetch_thread(self) -> None:
        if self.spec.cpu_threads is not None:
            # Sets this thread's count, and the default of every thread whose first parallel torch call comes later
            # (a step loop thread started since, say: on a GPU its torch calls launch kernels, needing no CPU threads).
            # Threads that made one already keep theirs.
            torch.set_num_threads(self.spec.cpu_threads)

    def fetch_async(
        self, ref: AdapterRef, tenant: str | None, in_slots: Collection[str] = ()
    ) -> Future[tuple[str, LoraWeights | None]]:
        return self._fetcher.submit(self.fetch, ref, tenant, in_slots)

    def fetch(
        self, ref: AdapterRef, tenant: str | None, in_slots: Collection[str] = ()
    ) -> tuple[str, LoraWeights | None]:
        """Resolve `ref` for `tenant` and return (repo@commit, weights), from the CPU cache or read from disk; the
        weights are None, and nothing is read, where the revision is not in the CPU cache but is in `in_slots` (the
        keys resident in slot memory: a request for it runs from its slot).

        Raises AdapterNotFoundError, or AdapterConfigError (subclasses) for an adapter that does not fit.
        """
        if self.source is None:
            from loramux.core.adapter_source import AdapterNotFoundError

            raise AdapterNotFoundError(f"adapter {ref} not found: this engine serves the base model only")
        resolved = self.source.resolve(ref, tenant)
        key = resolved.key
        with self._lock:
            self._note_revision(resolved.repo, resolved.commit)
            if key in in_slots and key not in self._cpu:
                self.slot_only += 1
                return key, None
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
                weights = self.spec.read(path, lambda n: allocate(n)[1])
        except BaseException:
            for offset in regions:
                self.arena.free(offset)
            raise
        for offset in regions:  # back to the arena once nothing (cache, request, slot write) holds the weights
            weakref.finalize(weights, self.arena.free, offset)
        if weights.max_rank > self.max_rank:
            raise AdapterTooLargeError(
                f"adapter {repo} has rank {weights.max_rank}; this server serves ranks up to {self.max_rank}"
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
        """(Under the lock.) Where `commit` is not the revision of `repo` seen last, the others leave the cache and
        `on_new_revision` is told, in the order the revisions were seen."""
        if self._latest.get(repo, commit) != commit:
            prefix = f"{repo}@"
            for key in [k for k in self._cpu if k.startswith(prefix) and k != f"{repo}@{commit}"]:
                del self._cpu[key]
            self.on_new_revision(repo, commit)
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

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "adapter_cache_hits": self.hits,
                "adapter_cache_misses": self.misses,
                "adapter_fetches_in_slots": self.slot_only,
                "adapter_cache_entries": len(self._cpu),
                "adapter_cache_bytes": sum(w.nbytes() for w in self._cpu.values()),
                "adapter_loads": self.loads,
                "adapter_read_seconds": self.read_seconds,
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
        if self.readers is not None:
            self.readers.close()
