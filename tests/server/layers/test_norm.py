"""RMSNorm computes what Hugging Face's Llama computes: the same in fp32, within a bf16 rounding in bf16 (on a GPU,
torch's fused kernel)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loramux.server.layers.norm import RMSNorm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_llama_reference(dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 64, generator=gen) * 3).to(device, dtype)
    weight = (1 + 0.2 * torch.randn(64, generator=gen)).to(device, dtype)
    reference = LlamaRMSNorm(64, eps=1e-5).to(device, dtype)
    reference.weight.data.copy_(weight)
    ours = RMSNorm(weight, eps=1e-5)
    got, want = ours(x), reference(x)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    # fp32: the same; bf16: one rounding apart at most, a bf16 ulp (2^-7 relative) and a little
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-2}
    torch.testing.assert_close(got.float(), want.float(), **tolerance)
    # a row scaled up (by 8: exact in either dtype) comes out the same, and eps keeps a zero row at zero
    torch.testing.assert_close(ours(x * 8).float(), got.float(), **tolerance)
    assert ours(torch.zeros(2, 64, dtype=dtype, device=device)).abs().max() == 0
