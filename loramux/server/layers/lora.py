"""Multi-adapter LoRA: every target module holds stacked adapter slots and a batch carries one slot per token.

Each `LoraLinear` holds `A [slots, r_max, in]`, `B [slots, out, r_max]` and a scaling per slot. An adapter whose
rank is below `r_max` has zero-padded A rows / B columns, and a module an adapter does not target has zero A/B in
that slot, so the padded math is exact. `shrink` and `expand` are the two halves of `y += s·(x·Aᵀ)·Bᵀ`; the torch
versions here are the reference that runs anywhere. On CUDA they dispatch to the Triton kernels of
`lora_kernels.py` (same signatures) when that module imports.

Modules that read the same input (q/k/v, gate/up) can share one `LoraGroup`: their A stacks are views into one
`(S, G·r_max, in)` tensor, so on the GPU one shrink reads x once for all of them and one launch expands into every
output (`lora_kernels.expand_fused`). On the CPU a group runs module by module through the reference.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from loramux.server.layers.nf4_linear import NF4Linear

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


def plan_step(token_slots: torch.Tensor | None, num_slots: int) -> Segments | None:
    """The segment plan of a step's (T,) token slots for every LoRA layer, or None where the kernels' gather path
    (few tokens, decode) or the CPU reference runs. Made once per step: a sort and a search on the device."""
    kernels = _kernels() if token_slots is not None and token_slots.is_cuda else None
    if kernels is None or token_slots.shape[0] <= kernels.GATHER_MAX_TOKENS:
        return None
    return kernels.plan_segments(token_slots, num_slots)


def _slot_groups(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, row indices) for every slot >= 0 present in `token_slots` (T,)."""
    groups = []
    for slot in torch.unique(token_slots).tolist():
        if slot >= 0:
            groups.append((slot, (token_slots == slot).nonzero().squeeze(1)))
    return groups


def shrink_torch(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x (T, in), a (S, r_max, in), token_slots (T,) -> h (T, r_max); rows with slot -1 are zero."""
    h = x.new_zeros(x.shape[0], a.shape[1])
    # Grouped by slot: one matmul per adapter present, instead of a (T, r_max, in) gather of A per token.
    for slot, rows in _slot_groups(token_slots):
        h[rows] = x[rows] @ a[slot].T
    return h


def expand_torch(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, scalings: torch.Tensor
) -> None:
    """y (T, out) += scalings[slot] · h (T, r_max) @ b[slot]ᵀ for tokens with slot >= 0; b (S, out, r_max)."""
    for slot, rows in _slot_groups(token_slots):
        y[rows] += (h[rows] @ b[slot].T) * scalings[slot].to(y.dtype)  # rows are distinct: a plain scatter


def shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    kernels = _kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.shrink(x, a, token_slots)
    return shrink_torch(x, a, token_slots)


def expand(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, scalings: torch.Tensor
) -> None:
    kernels = _kernels() if y.is_cuda else None
    if kernels is not None:
        kernels.expand(y, h, b, token_slots, scalings)
    else:
        expand_torch(y, h, b, token_slots, scalings)


class LoraLinear(NF4Linear):
    """An NF4 linear layer with stacked LoRA slots. Without slots allocated it is the plain NF4 layer."""

    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scalings: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__(weight, bias, compute_dtype)
        self.register_buffer("lora_a", None, persistent=False)
        self.register_buffer("lora_b", None, persistent=False)
        self.register_buffer("scalings", None, persistent=False)
        self.register_buffer("ranks", None, persistent=False)  # (S,) int32 true rank per slot, 0 = not targeted
        self._written: list[int] = []  # per slot, the rows of A and B that may be non-zero (host-side)
        self._fill_views: dict[int, tuple[int, list[torch.Tensor]]] = {}  # slot -> (rank, views of A and B)

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        device, dtype = self.packed.device, self.compute_dtype
        self.lora_a = torch.zeros(num_slots, max_rank, self.in_features, device=device, dtype=dtype)
        self.lora_b = torch.zeros(num_slots, self.out_features, max_rank, device=device, dtype=dtype)
        self.scalings = torch.zeros(num_slots, device=device, dtype=torch.float32)
        self.ranks = torch.zeros(num_slots, device=device, dtype=torch.int32)
        self._written = [0] * num_slots
        self._fill_views = {}

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's (r, in) A and (out, r) B into `slot`, zero-padded to r_max; None clears the slot.

        Every operation is enqueued without a host synchronisation (from pinned memory on a GPU, the copies are
        asynchronous); the padding is zeroed only where the slot's previous adapter wrote rows.
        """
        rank = 0 if a is None or b is None else a.shape[0]
        fill, zero = self.slot_writes(slot, rank)
        for view, source in zip(fill, (a, b), strict=False):
            view.copy_(source, non_blocking=True)
        for view in zero:
            view.zero_()
        self.scalings[slot].fill_(scaling if rank else 0.0)
        self.ranks[slot].fill_(rank)

    def slot_writes(self, slot: int, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For an adapter of `rank` going into `slot`: the views its A and B fill, and the rows to zero (those the
        slot's previous adapter wrote beyond `rank`). The caller must then fill them (as `write_slot` does); the
        slot counts as holding `rank` rows from here on."""
        written = self._written[slot]
        # the views of the slot's last rank are kept: making them on every load costs more than the copies
        kept_rank, fill = self._fill_views.get(slot, (0, []))
        if rank and kept_rank != rank:
            fill = [self.lora_a[slot, :rank], self.lora_b[slot, :, :rank]]
            self._fill_views[slot] = (rank, fill)
        elif not rank:
            fill = []
        zero = [self.lora_a[slot, rank:written], self.lora_b[slot, :, rank:written]] if rank < written else []
        self._written[slot] = rank
        return fill, zero

    def lora_delta(
        self, x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, segments: Segments | None = None
    ) -> None:
        """y (T, out) += this layer's LoRA of x (T, in) for each token's slot."""
        kernels = _kernels() if x.is_cuda else None
        if kernels is not None:  # the GPU kernels also bound their work by each slot's true rank
            h = kernels.shrink(x, self.lora_a, token_slots, ranks=self.ranks, segments=segments)
            kernels.expand(y, h, self.lora_b, token_slots, self.scalings, ranks=self.ranks, segments=segments)
        else:
            h = shrink_torch(x, self.lora_a, token_slots)
            expand_torch(y, h, self.lora_b, token_slots, self.scalings)

    def forward(
        self, x: torch.Tensor, token_slots: torch.Tensor | None = None, segments: Segments | None = None
    ) -> torch.Tensor:
        y = super().forward(x)
        if token_slots is not None and self.lora_a is not None:
            self.lora_delta(x, y, token_slots, segments)
        return y


class LoraGroup:
    """LoRA layers that read the same input (q/k/v or gate/up), with their A stacks in one tensor.

    `allocate_slots` gives every member views into shared `A (S, G·r_max, in)`, `ranks (S, G)` and
    `scalings (S, G)`, so each member still reads and writes its own slots as a plain `LoraLinear`.
    """

    def __init__(self, layers: list[LoraLinear]) -> None:
        if not 1 <= len(layers) <= 3 or len({m.in_features for m in layers}) != 1:
            raise ValueError("a LoRA group takes 1 to 3 layers of the same input size")
        self.layers = layers
        self.lora_a: torch.Tensor | None = None
        self.ranks: torch.Tensor | None = None
        self.scalings: torch.Tensor | None = None

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        first, g = self.layers[0], len(self.layers)
        device, dtype = first.packed.device, first.compute_dtype
        self.lora_a = torch.zeros(num_slots, g * max_rank, first.in_features, device=device, dtype=dtype)
        self.ranks = torch.zeros(num_slots, g, device=device, dtype=torch.int32)
        self.scalings = torch.zeros(num_slots, g, device=device, dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            layer.lora_b = torch.zeros(num_slots, layer.out_features, max_rank, device=device, dtype=dtype)
            layer.lora_a = self.lora_a[:, i * max_rank : (i + 1) * max_rank]  # (S, r_max, in), a view
            layer.ranks = self.ranks[:, i]
            layer.scalings = self.scalings[:, i]
            layer._written = [0] * num_slots
            layer._fill_views = {}

    def __call__(
        self, x: torch.Tensor, token_slots: torch.Tensor | None = None, segments: Segments | None = None
    ) -> list[torch.Tensor]:
        """x (T, in) -> each member's output (T, out_g), base plus LoRA."""
        ys = [NF4Linear.forward(layer, x) for layer in self.layers]
        if token_slots is None or self.lora_a is None:
            return ys
        kernels = _kernels() if x.is_cuda else None
        if kernels is None:
            for layer, y in zip(self.layers, ys, strict=True):
                layer.lora_delta(x, y, token_slots)
            return ys
        # One shrink reads x once for all members: h (T, G·r_max); one launch writes every member's output.
        g = len(self.layers)
        h = kernels.shrink(x, self.lora_a, token_slots, ranks=self.ranks, groups=g, segments=segments)
        bs = [layer.lora_b for layer in self.layers]
        kernels.expand_fused(ys, h, bs, token_slots, self.scalings, ranks=self.ranks, segments=segments)
        return ys
