"""Multi-adapter LoRA: every target module holds stacked adapter slots and a batch carries one slot per token.

Each `LoraLinear` holds `A [slots, r_max, in]`, `B [slots, out, r_max]` and a scaling per slot. An adapter whose
rank is below `r_max` has zero-padded A rows / B columns, and a module an adapter does not target has zero A/B in
that slot, so the padded math is exact. `shrink` and `expand` are the two halves of `y += s·(x·Aᵀ)·Bᵀ`; the torch
versions here are the reference that runs anywhere. On CUDA they dispatch to the Triton kernels of
`lora_kernels.py` (same signatures) when that module imports.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from loramux.server.layers.nf4_linear import NF4Linear


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from loramux.server.layers import lora_kernels
    except ImportError:
        return None
    return lora_kernels


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

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        device, dtype = self.packed.device, self.compute_dtype
        self.lora_a = torch.zeros(num_slots, max_rank, self.in_features, device=device, dtype=dtype)
        self.lora_b = torch.zeros(num_slots, self.out_features, max_rank, device=device, dtype=dtype)
        self.scalings = torch.zeros(num_slots, device=device, dtype=torch.float32)
        self.ranks = torch.zeros(num_slots, device=device, dtype=torch.int32)

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's (r, in) A and (out, r) B into `slot`, zero-padded to r_max; None clears the slot."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0
        if a is None or b is None:
            return
        rank = a.shape[0]
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.scalings[slot] = scaling
        self.ranks[slot] = rank

    def forward(self, x: torch.Tensor, token_slots: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        if token_slots is None or self.lora_a is None:
            return y
        kernels = _kernels() if x.is_cuda else None
        if kernels is not None:  # the GPU kernels also bound their work by each slot's true rank
            h = kernels.shrink(x, self.lora_a, token_slots, ranks=self.ranks)
            kernels.expand(y, h, self.lora_b, token_slots, self.scalings, ranks=self.ranks)
        else:
            h = shrink_torch(x, self.lora_a, token_slots)
            expand_torch(y, h, self.lora_b, token_slots, self.scalings)
        return y
