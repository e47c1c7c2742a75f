"""KV block bookkeeping: block tables grow on demand, free returns every block."""

from __future__ import annotations

import pytest

from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, SamplingParams


def request() -> Request:
    return Request("r", [1, 2, 3], SamplingParams(), None, None, set())


def test_grow_and_free():
    blocks = BlockManager(num_blocks=4, block_size=4)
    a, b = request(), request()
    blocks.grow(a, 5)  # 2 blocks
    blocks.grow(b, 4)  # 1 block
    assert blocks.num_free == 1
    assert blocks.can_grow(a, 12) and not blocks.can_grow(a, 13)
    blocks.grow(a, 8)  # still 2 blocks
    assert len(a.block_table) == 2
    with pytest.raises(RuntimeError, match="KV blocks wanted"):
        blocks.grow(b, 16)
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free == 4 and a.block_table == [] and a.num_computed == 0
