"""A Triton matrix product that reads NF4 weights as they are stored: `y = x·dequant(W)ᵀ (+ b)` in one kernel.

bitsandbytes multiplies by an NF4 weight, above one row, by dequantizing the whole weight to bf16 in memory and then
running a bf16 GEMM over that copy: for the 8B shape about 4 GB read and 16 GB written by the dequantization, and
16 GB read again by the GEMMs, every step. Here each program loads its tile of the packed 4-bit weight, looks every
value up in the 16-entry NF4 code, scales it by its block's absmax and multiplies it on the tensor cores, so the only
weight traffic is the 4-bit weight itself (about 0.53 bytes a value with the constants).

Status: correct (tests/server/layers/test_nf4_kernels.py) but not used: `NF4Linear` takes it only up to
`nf4_linear.FUSED_MAX_ROWS` rows, 0 by default, since on an H200 it was slower than bitsandbytes at every row count
(`loadtests/bench_nf4.py`; summed over a decode step's 224 layers of the 8B shape, the best configuration found per
shape against bitsandbytes: 9.6 against 4.0 ms at 1 row, 10.4 against 10.3 at 16, 13.3 against 12.3 at 64, 31.0
against 14.0 at 256). What bounds it is the work per weight value, not the bytes: the
code's table is looked up once per value (one load or a tree of 15 selects), the value scaled and rounded, and the
tile moved into the layout the tensor cores read, for every row tile of x; bitsandbytes' dequantization kernel spends
about as long per value, but once per weight. A faster lookup (two values per byte-indexed load, or a register
permute) is where to start.

The weight's values are exactly the ones bitsandbytes' dequantization writes: `bf16(code[q] · absmax)` rounded to
nearest from fp32, with the absmax constants dequantized once (`NF4Linear.serving_state`); only the order of the
products' accumulation differs from cuBLAS's (fp32 accumulators in both).

Layout (bitsandbytes' `quantize_4bit` with a block size of 64, `quant_storage=uint8`): `W (N, K)` flattened row by
row, two values a byte (the first in the high four bits), one absmax per 64 consecutive values. With `K` a
multiple of 64 a block never crosses a row, so each (row, 64 columns) tile has one scale.

Tiles: `BLOCK_M` rows of x by `BLOCK_N` rows of W, `BLOCK_K` (a multiple of 64) columns at a time, the product taken
as `yᵀ = W·xᵀ` by default (`swap`: the dequantized tile is the left operand, which the tensor cores read from
registers; 2-4x faster than `x·Wᵀ` here); where the tiles are too few to fill the GPU, the columns are split over
`split` programs whose fp32 partial products are summed after (deterministically, not by atomics). The launch takes
device tensors and shapes only: capturable in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

QUANT_BLOCK = 64  # values per absmax constant: the layout this kernel reads


@dataclass(frozen=True)
class Config:
    """One launch configuration: tile sizes, the split of K, warps and pipeline stages, and two ways of computing."""

    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    warps: int = 4
    stages: int = 1  # the code's table lookups staged through shared memory at more: slower at every size measured
    tree: bool = False  # the code's values chosen bit by bit (else looked up in its table)
    swap: bool = True  # computed as yᵀ = W·xᵀ (the dequantized tile the left operand)


@triton.jit
def _pick(bit, one, zero):
    return tl.where(bit, one, zero)


@triton.jit
def _nf4_tree(q, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """The code's value for 4-bit indices `q`, chosen bit by bit among its 16 values (15 selects, no memory access)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    low = _pick(b2, _pick(b1, _pick(b0, c7, c6), _pick(b0, c5, c4)), _pick(b1, _pick(b0, c3, c2), _pick(b0, c1, c0)))
    high = _pick(b2, _pick(b1, _pick(b0, c15, c14), _pick(b0, c13, c12)),
                 _pick(b1, _pick(b0, c11, c10), _pick(b0, c9, c8)))  # fmt: skip
    return _pick((q & 8) != 0, high, low)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_os, k_per_split,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, TREE: tl.constexpr, SWAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid: (M tiles x N tiles, splits of K). Programs next to each other share a tile of W (m varies fastest).
    # A tile of W is read as bytes, (BLOCK_N, 32) per 64 columns: the high four bits hold the even columns, the low
    # four the odd ones, so it multiplies as two products, x's even columns by the one, its odd columns by the other.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, 32)  # bytes of one absmax block's row
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows_n = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    x_rows_t = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    w_rows = packed_ptr + rows_n[:, None] * (K // 2)
    s_rows = absmax_ptr + rows_n * (K // 64)
    if SWAP:  # noqa: SIM108 (yᵀ = W·xᵀ: the dequantized tile is the product's left operand, taken from registers)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c = ()
    if TREE:  # the 16 values, loaded once
        c = (tl.load(code_ptr), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
             tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
             tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
             tl.load(code_ptr + 12), tl.load(code_ptr + 13),
             tl.load(code_ptr + 14), tl.load(code_ptr + 15))  # fmt: skip
    k_start = pid_k * k_per_split  # a multiple of BLOCK_K, as k_per_split is
    for step in range(0, k_per_split, BLOCK_K):
        for part in tl.static_range(BLOCK_K // 64):
            k = k_start + step + part * 64  # a multiple of 64: one absmax per row of the tile
            ok = k < K
            cols = k + 2 * offs_b
            byte = tl.load(w_rows + (k // 2 + offs_b)[None, :], mask=n_mask[:, None] & ok, other=0)
            scale = tl.load(s_rows + k // 64, mask=n_mask & ok, other=0.0)[:, None]
            if TREE:
                high = _nf4_tree(byte >> 4, *c)
                low = _nf4_tree(byte & 15, *c)
            else:
                high = tl.load(code_ptr + (byte >> 4).to(tl.int32))
                low = tl.load(code_ptr + (byte & 15).to(tl.int32))
            dtype = x_ptr.dtype.element_ty
            high = (high * scale).to(dtype)
            low = (low * scale).to(dtype)
            if SWAP:
                x_even = tl.load(x_rows_t + cols[:, None], mask=m_mask[None, :] & ok, other=0.0)  # (32, BLOCK_M)
                x_odd = tl.load(x_rows_t + (cols + 1)[:, None], mask=m_mask[None, :] & ok, other=0.0)
                acc = tl.dot(high, x_even, acc)
                acc = tl.dot(low, x_odd, acc)
            else:
                x_even = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & ok, other=0.0)  # (BLOCK_M, 32)
                x_odd = tl.load(x_rows + (cols + 1)[None, :], mask=m_mask[:, None] & ok, other=0.0)
                acc = tl.dot(x_even, tl.trans(high), acc)
                acc = tl.dot(x_odd, tl.trans(low), acc)
    if SWAP:
        acc = tl.trans(acc)
    mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:  # fp32 partial sums of this split, added up after the launch
        out = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter, on the CPU
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(m: int, n: int, k: int, multiprocessors: int = 132) -> Config:
    """The launch configuration for an (m, k) x (n, k)ᵀ product, after the best ones `loadtests/bench_nf4.py
    --search` found on an H200 for the 8B shapes: x's tile as tall as the rows (16 to 256, so W's tile is
    dequantized once for up to 256 rows), 128 rows of W from 64 rows of x up, and the columns split until the
    programs cover the multiprocessors about twice."""
    block_m = min(256, max(16, triton.next_power_of_2(m)))
    block_n = 64 if m <= 16 else 128
    block_k = 128 if k % 128 == 0 else 64
    split = split_for(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, multiprocessors)
    warps = 4 if block_m * block_n <= 64 * 64 else 8
    return Config(block_m, block_n, block_k, split, warps)


def split_for(tiles: int, k: int, block_k: int, multiprocessors: int = 132) -> int:
    """The split of K for `tiles` output tiles: doubled until the programs cover the multiprocessors about twice,
    while each split keeps at least four steps of `block_k` columns."""
    split = 1
    while tiles * split < 2 * multiprocessors and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def supported(k: int, dtype: torch.dtype) -> bool:
    """Whether `nf4_matmul` takes a weight of `k` columns with activations in `dtype`."""
    return k % QUANT_BLOCK == 0 and dtype in (torch.bfloat16, torch.float16)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """`x (..., k) · dequant(W)ᵀ (+ bias) -> (..., n)` in x's dtype, for `W (n, k)` packed by bitsandbytes
    (`packed`: its n·k/2 bytes; `absmax`: its n·k/64 constants in fp32, already dequantized; `code`: the 16 NF4
    values in fp32). `config`: the launch (default `pick_config`)."""
    k = x.shape[-1]
    if not supported(k, x.dtype):
        raise ValueError(f"nf4_matmul takes bf16 or fp16 activations and a multiple of 64 columns, got {x.dtype}, {k}")
    if packed.numel() * 2 != n * k or absmax.numel() * QUANT_BLOCK != n * k:
        raise ValueError(f"the packed weight ({packed.numel()} bytes, {absmax.numel()} constants) is not ({n}, {k})")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    cfg = config or pick_config(m, n, k, _multiprocessors(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    partial = splits > 1
    target = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if partial else out
    _nf4_matmul_kernel[grid](
        rows, packed, absmax, code, bias if bias is not None else absmax, target,
        m, n, k, rows.stride(0), target.stride(-2), target.stride(0) if partial else 0, k_per_split,
        HAS_BIAS=bias is not None and not partial, PARTIAL=partial, TREE=cfg.tree, SWAP=cfg.swap,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    if partial:
        summed = target.sum(0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)
    return out.reshape(*x.shape[:-1], n)
