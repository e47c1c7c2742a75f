"""The host arena the adapter CPU cache is carved from."""

from __future__ import annotations

import pytest
import torch

from loramux.server.engine.host_arena import ALIGNMENT, HostArena


def test_regions_are_aligned_disjoint_and_views_of_the_arena():
    arena = HostArena(10 * ALIGNMENT, pin_memory=False)
    a_offset, a = arena.allocate(3)
    b_offset, b = arena.allocate(ALIGNMENT + 1)
    assert (a_offset, b_offset) == (0, ALIGNMENT)  # 3 bytes still take one aligned unit
    assert a.numel() == 3 and b.numel() == ALIGNMENT + 1
    assert a.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
    a.fill_(1)
    b.fill_(2)
    assert int(a.sum()) == 3 and int(b.sum()) == 2 * (ALIGNMENT + 1)
    assert arena.used == 3 * ALIGNMENT


def test_a_full_arena_refuses_and_a_freed_gap_is_reused_first_fit():
    arena = HostArena(4 * ALIGNMENT, pin_memory=False)
    offsets = [arena.allocate(ALIGNMENT)[0] for _ in range(4)]
    assert arena.allocate(1) is None
    arena.free(offsets[1])
    assert arena.allocate(2 * ALIGNMENT) is None  # one unit free: too small
    arena.free(offsets[2])
    offset, _ = arena.allocate(2 * ALIGNMENT)  # the two freed neighbours form one gap
    assert offset == offsets[1]
    assert arena.allocate(ALIGNMENT) is None
    assert arena.allocate(5 * ALIGNMENT) is None  # larger than the arena


def test_free_never_blocks_even_while_the_arena_is_busy_in_the_same_thread():
    # The adapter cache frees from a finalizer, which the garbage collector may run inside `allocate` itself.
    arena = HostArena(2 * ALIGNMENT, pin_memory=False)
    offset, _ = arena.allocate(2 * ALIGNMENT)
    with arena._lock:  # as if `allocate` were running on this thread
        arena.free(offset)  # must not wait for the lock
    assert arena.used == 0
    assert arena.allocate(2 * ALIGNMENT)[0] == offset


@pytest.mark.gpu
def test_a_shared_arena_on_a_gpu_is_page_locked_so_copies_from_it_do_not_wait():
    arena = HostArena(1 << 20, pin_memory=True, shared=True)
    assert arena.pinned and arena.fd is not None
    _, region = arena.allocate(4096)
    assert region.is_pinned()
    region.copy_(torch.arange(4096) % 251)
    target = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)  # about a second of device work queued first
        target.copy_(region, non_blocking=True)
    assert not stream.query()  # the copy was queued behind it: the host did not wait (from pageable memory it would)
    stream.synchronize()
    assert torch.equal(target.cpu(), region)
    arena.close()
    assert not arena.pinned
