"""The host arena the adapter CPU cache is carved from."""

from __future__ import annotations

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
