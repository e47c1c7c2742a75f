"""The layout of LoRA slot memory (pure arithmetic, no torch): how `--slots` and `--max-lora-rank` become pages,
and how many pages an adapter of a given rank takes. `lora.py` allocates the memory; `engine/adapter_slots.py` hands
out its pages.

One word per concept: a page is the unit of slot memory (`page_rank` rows of every module's A and Bᵀ); a slot is a
run of pages holding one adapter, identified by its first page (the index a batch carries per token), so slot
indices range over the pages."""

from __future__ import annotations

from dataclasses import dataclass

PAGE_RANK = 8  # rows of one page of slot memory (where the slot rank is a multiple of it)


@dataclass(frozen=True)
class SlotLayout:
    """Slot memory that holds `num_slots` slots of `max_rank` (more of lower rank), in pages of `page_rank` rows.

    pages: how many (the slot indices). rows: rows of A per module, with `max_rank - page_rank` rows past the last page
    so that every page's `(max_rank, in)` view lies inside the tensor.
    """

    num_slots: int
    max_rank: int
    page_rank: int

    @classmethod
    def of(cls, num_slots: int, max_rank: int, page_rank: int | None = None) -> SlotLayout:
        if num_slots < 0 or max_rank < 1:
            raise ValueError(f"slot memory needs num_slots >= 0 and max_rank >= 1, got {num_slots} and {max_rank}")
        if page_rank is None:
            page_rank = PAGE_RANK if max_rank % PAGE_RANK == 0 else max_rank
        if page_rank < 1 or max_rank % page_rank or not _is_pow2(max_rank // page_rank):
            raise ValueError(f"page rank {page_rank} must divide max rank {max_rank} by a power of two")
        return cls(num_slots, max_rank, page_rank)

    @property
    def pages(self) -> int:
        return self.num_slots * self.max_rank // self.page_rank

    @property
    def rows(self) -> int:
        return self.pages * self.page_rank + self.max_rank - self.page_rank

    def pages_for(self, rank: int) -> int:
        """Pages an adapter of `rank` holds: the power of two that covers it (at most a slot's worth)."""
        needed = max(1, -(-rank // self.page_rank))
        return min(1 << (needed - 1).bit_length(), self.max_rank // self.page_rank)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
