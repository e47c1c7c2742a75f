"""One block of host memory, allocated once, that the adapter CPU cache is carved from.

On a GPU the block is page-locked, so that a slot write is one asynchronous copy. Page-locking memory while the
engine serves stalls it: with four threads allocating 54 MB page-locked buffers (what each new adapter in the cache
would take), a loop of kernel launches on another thread stalled for up to 6 s on an H100 host. The
arena page-locks its whole capacity at start instead, and regions are handed out first-fit, at 256-byte alignment.
A region returns to the arena when `free` is called; the adapter cache calls it when the last reference to the
weights in it is gone (a request waiting for a slot, or a slot write in progress, keeps the region alive). That can
happen in any thread at any moment, the garbage collector's included, even inside `allocate` on the same thread, so
`free` takes no lock: it queues the offset, and the next `allocate` (or `used`) returns the queued regions first.

A `shared` arena lives in a memory file (`memfd`, `fd`) that other processes map too: the adapter reader processes
(`adapter_reader`) read adapters straight into it. On a GPU it is page-locked where it is (`cudaHostRegister`)
rather than allocated page-locked; where that fails it stays pageable (slot writes from it then copy synchronously).
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
from collections import deque

import torch

log = logging.getLogger(__name__)

ALIGNMENT = 256


class HostArena:
    def __init__(self, capacity: int, pin_memory: bool, shared: bool = False) -> None:
        self.capacity = capacity - capacity % ALIGNMENT
        self.fd: int | None = None  # the memory file of a shared arena
        self._map: mmap.mmap | None = None
        if shared and self.capacity:
            self.fd = os.memfd_create("loramux-adapter-cache", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.capacity)
            self._map = mmap.mmap(self.fd, self.capacity)
            self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
            self.pinned = pin_memory and _register(self.buffer)
        else:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=pin_memory)
            self.pinned = pin_memory
        self._starts: list[int] = []  # sorted start offsets of the regions in use
        self._sizes: dict[int, int] = {}  # start -> size (rounded up to ALIGNMENT)
        self._lock = threading.Lock()
        self._freed: deque[int] = deque()  # offsets freed since the last allocate (appends are atomic)

    @property
    def used(self) -> int:
        with self._lock:
            self._return_freed()
            return sum(self._sizes.values())

    def allocate(self, nbytes: int) -> tuple[int, torch.Tensor] | None:
        """(offset, a uint8 tensor of `nbytes` bytes) from the first gap that holds it; None if none does."""
        size = -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
        with self._lock:
            self._return_freed()
            start = 0
            for begin in self._starts:
                if begin - start >= size:
                    break
                start = begin + self._sizes[begin]
            if self.capacity - start < size:
                return None
            bisect.insort(self._starts, start)
            self._sizes[start] = size
        return start, self.buffer[start : start + nbytes]

    def close(self) -> None:
        """Give up a shared arena's page-locking and memory file (regions still in use stay readable, pageable)."""
        if self.fd is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False
        os.close(self.fd)
        self.fd = None

    def free(self, offset: int) -> None:
        """Return the region at `offset` (it is reused from the next `allocate` on)."""
        self._freed.append(offset)

    def _return_freed(self) -> None:  # under self._lock
        while self._freed:
            offset = self._freed.popleft()
            del self._sizes[offset]
            self._starts.remove(offset)


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer`'s memory for the current CUDA device; False (logged) where the driver refuses."""
    error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    code = int(getattr(error, "value", error))
    if code:
        log.warning("page-locking the shared adapter cache failed (CUDA error %d): it stays pageable", code)
        return False
    return True
