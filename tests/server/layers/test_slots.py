"""Slot memory's layout: pages from slots and rank, and the pages an adapter of each rank takes."""

from __future__ import annotations

import pytest

from loramux.server.layers.slots import SlotLayout


def test_slot_layout_pages_by_rank():
    layout = SlotLayout.of(num_slots=4, max_rank=64)
    assert (layout.page_rank, layout.pages, layout.rows) == (8, 32, 32 * 8 + 56)
    assert [layout.pages_for(r) for r in (1, 8, 9, 16, 17, 24, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert SlotLayout.of(4, 12).page_rank == 12 and SlotLayout.of(4, 12).pages == 4  # not a multiple of 8: unpaged
    assert SlotLayout.of(4, 64, page_rank=64).pages == 4
    for bad in (dict(page_rank=24), dict(page_rank=0), dict(page_rank=128)):
        with pytest.raises(ValueError, match="page rank"):
            SlotLayout.of(4, 64, **bad)
