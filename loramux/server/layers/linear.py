"""A decoder linear layer kept unquantized, in the compute dtype: how a merged checkpoint is served by default,
since quantizing `dequant(NF4(W)) + s·B·A` to NF4 again can undo what the adapter changed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseLinear(nn.Module):
    """`y = x·Wᵀ + b` with `W` [out, in] in `compute_dtype` (bf16 on a GPU, fp32 on the CPU): 2 bytes a weight in
    bf16 against about 0.52 for NF4 with double quantization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight.to(compute_dtype).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False) if bias is not None else None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, {dtype}, bias={bias}"
