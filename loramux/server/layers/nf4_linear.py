"""A linear layer whose weight is stored in NF4 with double quantization (bitsandbytes, QLoRA's format)."""

from __future__ import annotations

import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # values per absmax block, as in QLoRA


def cpu_dequant_cache_enabled() -> bool:
    """`LORAMUX_CPU_DEQUANT_CACHE=0` turns the CPU cache of dequantized weights off (see NF4Linear)."""
    return os.environ.get("LORAMUX_CPU_DEQUANT_CACHE", "1") != "0"


class NF4Linear(nn.Module):
    """`y = x·Wᵀ + b` with `W` [out, in] packed to 4 bits; the absmax constants are themselves 8-bit quantized.

    `compute_dtype` is what activations and the dequantized weight are in: bf16 on a GPU, fp32 on the CPU.

    On the CPU, bitsandbytes dequantizes the whole weight on every call, which made a decode step of the 135M default
    model cost ~0.25 s; so on the CPU the layer keeps `dequant(NF4(W))` after its first use (the same values, so
    the same outputs) and multiplies with it. The NF4 weight stays the source of truth. On a GPU nothing is cached:
    memory is what NF4 is for there. `LORAMUX_CPU_DEQUANT_CACHE=0` turns the cache off.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        packed, state = bnbf.quantize_4bit(
            weight.to(compute_dtype).contiguous(),
            blocksize=BLOCK_SIZE,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
        self.register_buffer("packed", packed, persistent=False)
        self.quant_state = state
        self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False) if bias is not None else None
        self._dense: torch.Tensor | None = None  # CPU only: dequant(NF4(W)), (out, in), built on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type == "cpu" and cpu_dequant_cache_enabled():
            if self._dense is None:
                self._dense = self.dequantize()
            return F.linear(x, self._dense, self.bias)
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=self.quant_state, bias=self.bias)

    def dequantize(self) -> torch.Tensor:
        """The weight the model actually computes with, `dequant(NF4(W))`, [out, in] in `compute_dtype`."""
        return bnbf.dequantize_4bit(self.packed, self.quant_state)

    def _apply(self, fn, recurse: bool = True):  # keep the quantization constants on the same device
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)
        self._dense = None
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, bias={self.bias is not None}"
