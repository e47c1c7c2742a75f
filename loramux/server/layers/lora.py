"""Multi-adapter LoRA: every target module holds the adapters' A and B in slot memory paged by rank, and a batch
carries one slot per token.

Slot memory: `--slots N` at `--max-lora-rank R` gives every module N·R rows of A (and N·R rows of Bᵀ), cut into
pages of `page_rank` rows (8 where R is a multiple of 8, else R: one page per slot). An adapter of rank r holds a
run of pages (a power of two of them, aligned, enough for r: a buddy layout, see `SlotLayout`) and is addressed by
its first page, the slot index a batch carries. So the memory of one rank-64 slot holds one rank-64 adapter, two of
rank 32, or eight of rank 8 (how S-LoRA pages its unified memory, here at rank granularity). `LoraLinear.lora_a`
is a `(pages, R, in)` view of that memory whose page p starts at row p·page_rank (the views of neighbouring pages
overlap), `lora_b` likewise `(pages, out, R)` over B's memory kept rank-major, `(rows, out)`, so that the kernels
read a slot's B in whole rows of `out` values; with a true rank and scaling per page. Every read of a slot is
bounded by its true rank, on the CPU and on the GPU, so rows past it (a neighbour's, or stale) are never read and
a slot write never zeroes anything; a module an adapter does not target has rank 0 in that slot. A model allocates
the memory of all its modules as one `SlotMemory` (per projection, every layer's A and Bᵀ in one tensor; every
module's ranks and scalings in one table), so that an adapter is written into a slot with a few copies.

`shrink` and `expand` are the two halves of `y += s·(x·Aᵀ)·Bᵀ`; the torch versions here are the reference that
runs anywhere. On CUDA they dispatch to the Triton kernels of `lora_kernels.py` (same signatures) when that module
imports.

Modules that read the same input (q/k/v, gate/up) can share one `LoraGroup`: their A memories are one tensor with a
`(pages, G, R, in)` view, so on the GPU one shrink reads x once for all of them and one launch expands into every
output (`lora_kernels.expand_fused`). On the CPU a group runs module by module through the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from loramux.server.layers.linear import DenseLinear
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.layers.slots import SlotLayout

if TYPE_CHECKING:
    from loramux.server.layers.lora_kernels import Segments


@functools.cache
def _kernels() -> ModuleType | None:
    """The Triton kernels, or None where Triton is missing (they are used for CUDA tensors only)."""
    try:
        from loramux.server.layers import lora_kernels
    except ImportError:
        return None
    return lora_kernels


def plan_step(token_slots: torch.Tensor | None, num_pages: int) -> Segments | None:
    """The segment plan of a step's (T,) token slots for every LoRA layer, or None where the kernels' gather path
    (few tokens, decode) or the CPU reference runs. Made once per step: a sort and a search on the device."""
    kernels = _kernels() if token_slots is not None and token_slots.is_cuda else None
    if kernels is None or token_slots.shape[0] <= kernels.GATHER_MAX_TOKENS:
        return None
    return kernels.plan_segments(token_slots, num_pages)  # slot indices range over the pages


def _page_views(memory: torch.Tensor, layout: SlotLayout, groups: int) -> torch.Tensor:
    """The `(pages, groups, max_rank, in)` view of A memory `(groups·rows, in)`: page p, group g starts at row
    g·rows + p·page_rank."""
    width = memory.shape[1]
    return memory.as_strided(
        (layout.pages, groups, layout.max_rank, width), (layout.page_rank * width, layout.rows * width, width, 1)
    )


def _b_views(memory: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """The `(pages, out, max_rank)` view of B memory `(rows, out)` (rank-major: Bᵀ): page p starts at row
    p·page_rank."""
    width = memory.shape[1]
    return memory.as_strided((layout.pages, width, layout.max_rank), (layout.page_rank * width, 1, width))


def _slot_groups(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, row indices) for every slot >= 0 present in `token_slots` (T,)."""
    groups = []
    for slot in torch.unique(token_slots).tolist():
        if slot >= 0:
            groups.append((slot, (token_slots == slot).nonzero().squeeze(1)))
    return groups


def _rank(ranks: list[int] | None, slot: int, r_max: int) -> int:
    return r_max if ranks is None else min(ranks[slot], r_max)


def shrink_torch(
    x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """x (T, in), a (S, r_max, in), token_slots (T,) -> h (T, r_max); rows with slot -1 are zero. ranks (S,): each
    slot's true rank (None: r_max); rows of A past it are not read and h is zero there."""
    h = x.new_zeros(x.shape[0], a.shape[1])
    rank_list = None if ranks is None else ranks.tolist()
    # Grouped by slot: one matmul per adapter present, instead of a (T, r_max, in) gather of A per token.
    for slot, rows in _slot_groups(token_slots):
        rank = _rank(rank_list, slot, a.shape[1])
        if rank:
            h[rows, :rank] = x[rows] @ a[slot, :rank].T
    return h


def expand_torch(
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> None:
    """y (T, out) += scalings[slot] · h (T, r_max) @ b[slot]ᵀ for tokens with slot >= 0; b (S, out, r_max). ranks:
    as in `shrink_torch` (columns of B past a slot's rank are not read)."""
    rank_list = None if ranks is None else ranks.tolist()
    for slot, rows in _slot_groups(token_slots):
        rank = _rank(rank_list, slot, b.shape[2])
        if rank:  # rows are distinct: a plain scatter
            y[rows] += (h[rows, :rank] @ b[slot, :, :rank].T) * scalings[slot].to(y.dtype)


def shrink(
    x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    kernels = _kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.shrink(x, a, token_slots, ranks=ranks)
    return shrink_torch(x, a, token_slots, ranks)


def expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> None:
    kernels = _kernels() if y.is_cuda else None
    if kernels is not None:
        kernels.expand(y, h, b, token_slots, scalings, ranks=ranks)
    else:
        expand_torch(y, h, b, token_slots, scalings, ranks)


@dataclass
class SlotMemoryViews:
    """What one module's slots live in: A memory `(rows, in)`, Bᵀ memory `(rows, out)`, and its true rank and scaling
    per page, `(pages,)` each."""

    a: torch.Tensor
    b: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor


class SlotMemory:
    """The slot memory of every LoRA module of a model in a few tensors, so that writing an adapter into a slot is a
    few copies a projection whatever the number of layers (`SlotWriter.write`).

    Per site (modules that read one input: q/k/v, o, gate/up, down) A of every layer is one tensor
    `(layers, G·rows, in)`, member g's rows from g·rows; per projection Bᵀ of every layer is `(layers, rows, out)`;
    the ranks and scalings of every module are `(pages, modules)`, a column per module (a site's members side by
    side, so that its `(pages, G)` view is a slice). `sites`: per site, its projections' (name, in, out)."""

    def __init__(
        self,
        layout: SlotLayout,
        layers: int,
        sites: list[list[tuple[str, int, int]]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        width = sum(len(site) for site in sites)
        self.ranks = torch.zeros(layout.pages, layers * width, device=device, dtype=torch.int32)
        self.scalings = torch.zeros(layout.pages, layers * width, device=device, dtype=torch.float32)
        self.a: dict[str, tuple[torch.Tensor, int]] = {}  # projection -> (its site's A memory, its first row)
        self.b: dict[str, torch.Tensor] = {}  # projection -> Bᵀ memory
        self.columns: dict[tuple[str, int], int] = {}  # (projection, layer) -> column of ranks and scalings
        column = 0
        for site in sites:
            a = torch.zeros(layers, len(site) * layout.rows, site[0][1], device=device, dtype=dtype)
            for g, (name, _, out_features) in enumerate(site):
                self.a[name] = (a, g * layout.rows)
                self.b[name] = torch.zeros(layers, layout.rows, out_features, device=device, dtype=dtype)
                for layer in range(layers):
                    self.columns[(name, layer)] = layer * width + column + g
            column += len(site)

    def views(self, projection: str, layer: int) -> SlotMemoryViews:
        """One module's part (see `LoraLinear.allocate_slots`)."""
        a, row = self.a[projection]
        column = self.columns[(projection, layer)]
        rows = self.layout.rows
        return SlotMemoryViews(
            a[layer, row : row + rows], self.b[projection][layer], self.ranks[:, column], self.scalings[:, column]
        )

    def allocate_group(self, group: LoraGroup, projections: list[str], layer: int) -> None:
        """Give a site's modules in one layer their parts (its `(pages, G)` ranks and scalings a slice)."""
        first = self.columns[(projections[0], layer)]
        a = self.a[projections[0]][0][layer]
        group.allocate_slots(
            self.layout,
            a_memory=a,
            members=[self.views(name, layer) for name in projections],
            ranks=self.ranks[:, first : first + len(projections)],
            scalings=self.scalings[:, first : first + len(projections)],
        )


class LoraSlots:
    """LoRA slot memory on a decoder linear layer: mixed into `LoraLinear` (NF4 weight) and `DenseLoraLinear`
    (unquantized weight, a merged checkpoint), whose own `base_forward` computes `x·Wᵀ + b`. Without slots
    allocated the layer is its plain base layer."""

    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scalings: torch.Tensor | None
    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    device: torch.device

    def _init_slots(self) -> None:
        self.register_buffer("lora_a", None, persistent=False)  # (pages, r_max, in) view of the A memory
        self.register_buffer("lora_b", None, persistent=False)  # (pages, out, r_max) view of the Bᵀ memory
        self.register_buffer("scalings", None, persistent=False)  # (pages,) float32
        self.register_buffer("ranks", None, persistent=False)  # (pages,) int32 true rank, 0 = not targeted
        self.layout: SlotLayout | None = None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def allocate_slots(self, layout: SlotLayout, memory: SlotMemoryViews | None = None) -> None:
        """Slot memory for this layer: its own tensors, or the views `memory` gives (see `SlotMemory`)."""
        if memory is None:
            device, dtype = self.device, self.compute_dtype
            memory = SlotMemoryViews(
                torch.zeros(layout.rows, self.in_features, device=device, dtype=dtype),
                torch.zeros(layout.rows, self.out_features, device=device, dtype=dtype),
                torch.zeros(layout.pages, device=device, dtype=torch.int32),
                torch.zeros(layout.pages, device=device, dtype=torch.float32),
            )
        self.lora_a = _page_views(memory.a, layout, 1)[:, 0]
        self.lora_b = _b_views(memory.b, layout)
        self.ranks, self.scalings = memory.ranks, memory.scalings
        self.layout = layout

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's (r, in) A and (out, r) B into the slot starting at page `slot`; None clears it (rank 0).

        The slot must hold pages enough for r (`SlotLayout.pages_for`): the rows past them belong to the next slot.
        Every operation is enqueued without a host synchronisation (from pinned memory on a GPU, the copies are
        asynchronous).
        """
        if self.lora_a is None or self.lora_b is None or self.layout is None:
            raise RuntimeError("allocate_slots first")
        rank = 0 if a is None or b is None else a.shape[0]
        if not 0 <= rank <= self.layout.max_rank:
            raise ValueError(f"rank {rank} is outside 0..{self.layout.max_rank}, the slot memory's rank")
        if a is not None and b is not None:
            self.lora_a[slot, :rank].copy_(a, non_blocking=True)
            self.lora_b[slot, :, :rank].copy_(b, non_blocking=True)
        self.scalings[slot].fill_(scaling if rank else 0.0)
        self.ranks[slot].fill_(rank)

    def lora_delta(
        self, x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, segments: Segments | None = None
    ) -> None:
        """y (T, out) += this layer's LoRA of x (T, in) for each token's slot."""
        kernels = _kernels() if x.is_cuda else None
        if kernels is not None:  # the GPU kernels also bound their work by each slot's true rank
            h = kernels.shrink(x, self.lora_a, token_slots, ranks=self.ranks, segments=segments)
            kernels.expand(y, h, self.lora_b, token_slots, self.scalings, ranks=self.ranks, segments=segments)
        else:
            h = shrink_torch(x, self.lora_a, token_slots, self.ranks)
            expand_torch(y, h, self.lora_b, token_slots, self.scalings, self.ranks)

    def forward(
        self, x: torch.Tensor, token_slots: torch.Tensor | None = None, segments: Segments | None = None
    ) -> torch.Tensor:
        y = self.base_forward(x)
        if token_slots is not None and self.lora_a is not None:
            self.lora_delta(x, y, token_slots, segments)
        return y


class LoraLinear(LoraSlots, NF4Linear):
    """An NF4 linear layer with LoRA slot memory (the base model's decoder layers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        NF4Linear.__init__(self, weight, bias, compute_dtype)
        self._init_slots()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Linear.forward(self, x)


class DenseLoraLinear(LoraSlots, DenseLinear):
    """An unquantized linear layer with LoRA slot memory (a merged checkpoint served in bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        DenseLinear.__init__(self, weight, bias, compute_dtype)
        self._init_slots()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return DenseLinear.forward(self, x)


class LoraGroup:
    """LoRA layers that read the same input (q/k/v or gate/up), with their A memories in one tensor.

    `allocate_slots` gives the group a `(pages, G, r_max, in)` view of A and every member its own `(pages, r_max,
    in)` view of its part, with `ranks (pages, G)` and `scalings (pages, G)` shared the same way, so each member
    still reads and writes its own slots as a plain `LoraLinear`.
    """

    def __init__(self, layers: list[LoraSlots]) -> None:
        if not 1 <= len(layers) <= 3 or len({m.in_features for m in layers}) != 1:
            raise ValueError("a LoRA group takes 1 to 3 layers of the same input size")
        self.layers = layers
        self.lora_a: torch.Tensor | None = None
        self.ranks: torch.Tensor | None = None
        self.scalings: torch.Tensor | None = None

    def allocate_slots(
        self,
        layout: SlotLayout,
        a_memory: torch.Tensor | None = None,
        members: list[SlotMemoryViews] | None = None,
        ranks: torch.Tensor | None = None,
        scalings: torch.Tensor | None = None,
    ) -> None:
        """Slot memory for the group: its own tensors, or the given ones (`SlotMemory`): the shared A memory
        `(G·rows, in)`, each member's views (its B memory, its (pages,) ranks and scalings), and the `(pages, G)`
        views of ranks and scalings over the members' columns."""
        first, g = self.layers[0], len(self.layers)
        device, dtype = first.device, first.compute_dtype
        if a_memory is None or members is None or ranks is None or scalings is None:
            a_memory = torch.zeros(g * layout.rows, first.in_features, device=device, dtype=dtype)
            ranks = torch.zeros(layout.pages, g, device=device, dtype=torch.int32)
            scalings = torch.zeros(layout.pages, g, device=device, dtype=torch.float32)
            members = [
                SlotMemoryViews(
                    a_memory[i * layout.rows : (i + 1) * layout.rows],
                    torch.zeros(layout.rows, layer.out_features, device=device, dtype=dtype),
                    ranks[:, i],
                    scalings[:, i],
                )
                for i, layer in enumerate(self.layers)
            ]
        self.lora_a = _page_views(a_memory, layout, g)
        self.ranks, self.scalings = ranks, scalings
        for layer, views in zip(self.layers, members, strict=True):
            layer.allocate_slots(layout, views)

    def __call__(
        self, x: torch.Tensor, token_slots: torch.Tensor | None = None, segments: Segments | None = None
    ) -> list[torch.Tensor]:
        """x (T, in) -> each member's output (T, out_g), base plus LoRA."""
        ys = [layer.base_forward(x) for layer in self.layers]
        if token_slots is None or self.lora_a is None:
            return ys
        kernels = _kernels() if x.is_cuda else None
        if kernels is None:
            for layer, y in zip(self.layers, ys, strict=True):
                layer.lora_delta(x, y, token_slots)
            return ys
        # One shrink reads x once for all members: h (T, G·r_max); one launch writes every member's output.
        h = kernels.shrink(x, self.lora_a, token_slots, ranks=self.ranks, segments=segments)
        bs = [layer.lora_b for layer in self.layers]
        kernels.expand_fused(ys, h, bs, token_slots, self.scalings, ranks=self.ranks, segments=segments)
        return ys
