"""RMSNorm, computed in fp32 whatever the activations' dtype (as Llama does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`weight · x / sqrt(mean(x²) + eps)` over the last dimension, through torch's `rms_norm`: one fused kernel on
    a GPU, where the same written out in torch operations is eight elementwise kernels (65 calls a step for the 8B
    shape). It computes in fp32; with bf16 activations the weight multiplies the fp32 normalised value before the one
    rounding to bf16 (Hugging Face's Llama rounds before that product, so outputs may differ by a bf16 ulp)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
