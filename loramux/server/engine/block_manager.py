"""The paged KV cache's bookkeeping: a pool of fixed-size blocks and a block table per request."""

from __future__ import annotations

from collections import deque

from loramux.server.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, request: Request, num_tokens: int) -> bool:
        """Whether `request` can hold `num_tokens` tokens in total with the blocks free now."""
        return self.blocks_for(num_tokens) - len(request.block_table) <= self.num_free

    def grow(self, request: Request, num_tokens: int) -> None:
        """Give `request` enough blocks for `num_tokens` tokens in total."""
        missing = self.blocks_for(num_tokens) - len(request.block_table)
        if missing > self.num_free:
            raise RuntimeError(f"{missing} KV blocks wanted, {self.num_free} free")
        for _ in range(missing):
            request.block_table.append(self._free.popleft())

    def free(self, request: Request) -> None:
        self._free.extend(request.block_table)
        request.block_table = []
        request.num_computed = 0
