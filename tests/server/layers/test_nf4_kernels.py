"""The fused NF4 matrix product against bitsandbytes' own dequantization, then a float64 product: many shapes, row
counts, launch configurations, both half-precision dtypes, with and without bias; and NF4Linear's GPU paths."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from loramux.server.layers import nf4_linear
from loramux.server.layers.nf4_linear import NF4Linear

# Triton comes with torch's CUDA build, not its CPU build: without it the kernels cannot be imported, and the tests
# are collected and skipped (as every `gpu` test is without a CUDA device).
TRITON = find_spec("triton") is not None
if TRITON:
    from loramux.server.layers import nf4_kernels as nk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not TRITON, reason="needs Triton")]

DEVICE = "cuda"
# bf16 operands (the same weight values on both sides) accumulated in fp32, one rounding of the output: 2^-9 relative
TOLERANCE = {torch.bfloat16: 8e-3, torch.float16: 2e-3}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def layer(n: int, k: int, dtype: torch.dtype, bias: bool, seed: int) -> NF4Linear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    return NF4Linear(weight, b, dtype).to(DEVICE)


def reference(x: torch.Tensor, module: NF4Linear) -> torch.Tensor:
    """float64 product with the weight bitsandbytes dequantizes (the values the model computes with)."""
    bias = module.bias.double() if module.bias is not None else None
    return torch.nn.functional.linear(x.double(), module.dequantize().double(), bias)


def fused(x: torch.Tensor, module: NF4Linear, config: nk.Config | None = None) -> torch.Tensor:
    state = module.serving_state
    return nk.nf4_matmul(x, module.packed, state.absmax, state.code, module.out_features, module.bias, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(64, 64), (96, 576), (1024, 4096), (384, 1536), (200, 2048)])
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 128, 257, 600])
def test_fused_matches_dequantized_product(dtype: torch.dtype, n: int, k: int, rows: int) -> None:
    module = layer(n, k, dtype, bias=n == 96, seed=n + k)
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    got = fused(x, module)
    assert got.shape == (rows, n) and got.dtype == dtype
    assert rel_err(got, reference(x, module)) < TOLERANCE[dtype]


# nk.Config's fields: block_m, block_n, block_k, split, warps, stages, then tree and swap (made in the test, since
# `nk` exists only where Triton does)
@pytest.mark.parametrize(
    ("fields", "flags"),
    [
        ((16, 64, 64, 1, 4, 3), {"swap": False}),  # x·Wᵀ, staged loads
        ((16, 64, 128, 4, 4, 1), {"swap": False}),  # K split over four programs
        ((32, 128, 64, 5, 4, 2), {}),  # five splits of 320 columns: the last one gets 256
        ((64, 64, 128, 1, 8, 3), {"tree": True}),  # the code's values chosen bit by bit
        ((16, 128, 128, 3, 4, 1), {"tree": True, "swap": False}),
        ((32, 64, 64, 1, 4, 1), {}),
        ((256, 128, 128, 2, 8, 1), {}),
    ],
)
def test_every_launch_configuration_computes_the_same_product(fields: tuple[int, ...], flags: dict) -> None:
    config = nk.Config(*fields, **flags)
    module = layer(320, 1536, torch.bfloat16, bias=True, seed=7)
    x = torch.randn(70, 1536, device=DEVICE, dtype=torch.bfloat16)
    assert rel_err(fused(x, module, config), reference(x, module)) < TOLERANCE[torch.bfloat16]


def test_leading_dimensions_and_strided_rows_are_kept() -> None:
    module = layer(128, 256, torch.bfloat16, bias=False, seed=3)
    x = torch.randn(2, 5, 512, device=DEVICE, dtype=torch.bfloat16)[..., ::2]  # (2, 5, 256), not contiguous
    got = fused(x, module)
    assert got.shape == (2, 5, 128)
    assert rel_err(got, reference(x, module)) < TOLERANCE[torch.bfloat16]


def test_bad_inputs_are_refused() -> None:
    module = layer(64, 128, torch.bfloat16, bias=False, seed=1)
    state = module.serving_state
    with pytest.raises(ValueError, match="multiple of 64"):
        nk.nf4_matmul(torch.randn(2, 96, device=DEVICE, dtype=torch.bfloat16), module.packed, state.absmax,
                      state.code, 64)  # fmt: skip
    with pytest.raises(ValueError, match="bf16 or fp16"):
        nk.nf4_matmul(torch.randn(2, 128, device=DEVICE), module.packed, state.absmax, state.code, 64)
    with pytest.raises(ValueError, match="not \\(32, 128\\)"):
        nk.nf4_matmul(torch.randn(2, 128, device=DEVICE, dtype=torch.bfloat16), module.packed, state.absmax,
                      state.code, 32)  # fmt: skip


def test_layer_takes_the_kernel_up_to_its_row_limit_and_matches_the_other_paths(monkeypatch) -> None:
    module = layer(512, 1024, torch.bfloat16, bias=True, seed=11)
    x = torch.randn(48, 1024, device=DEVICE, dtype=torch.bfloat16)
    calls = []
    original = nk.nf4_matmul
    monkeypatch.setattr(nk, "nf4_matmul", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setattr(nf4_linear, "FUSED_MAX_ROWS", 64)  # the kernel switched on (it is off by default)
    with_kernel = module(x)
    assert calls == [1]
    monkeypatch.setattr(nf4_linear, "FUSED_MAX_ROWS", 0)  # bitsandbytes' matmul_4bit below 65 rows
    without = module(x)
    assert calls == [1]
    want = reference(x, module)
    assert rel_err(with_kernel, want) < TOLERANCE[torch.bfloat16]
    assert rel_err(without, want) < TOLERANCE[torch.bfloat16]
    monkeypatch.setattr(nf4_linear, "FUSED_MAX_ROWS", 32)  # 48 rows: above the limit, not the kernel
    module(x)
    assert calls == [1]


def test_kernel_is_captured_in_a_cuda_graph() -> None:
    module = layer(256, 512, torch.bfloat16, bias=False, seed=5)
    x = torch.randn(24, 512, device=DEVICE, dtype=torch.bfloat16)
    config = nk.Config(16, 64, 64, 2, 4, 3)  # with the partial sums' reduction inside the graph
    fused(x, module, config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused(x, module, config)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, module)) < TOLERANCE[torch.bfloat16]
