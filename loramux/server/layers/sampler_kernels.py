"""Triton passes of the sampler (`sampler.py`) for the GPU: each reads a row's entries once where the torch ops it
replaces read and wrote them several times (a subtraction, a division, an exponential, a mask and a sum, each a
pass over the batch's (rows, vocabulary) floats).

- `tempered`: `e = exp((l - max l) / temperature)` with the row's truncations (entries below its min-p floor, tokens
  below its k-th largest logit) set to 0, written into the sampler's work buffer, and the sum of each block of the
  two-level search, in one pass over the logits.
- `sums_above`: for some rows of that buffer, the sums of each block's entries strictly above a per-row pivot (the
  top-p check's mass, and the blocks of the next draw), without writing the masked entries anywhere.

A program takes `BLOCKS_PER_PROGRAM` search blocks of one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCKS_PER_PROGRAM = 4


@triton.jit
def _tempered_kernel(
    logits_ptr, max_ptr, inv_t_ptr, min_p_ptr, kth_ptr, e_ptr, sums_ptr,
    stride_l, stride_e, stride_s, vocab, blocks,
    BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    top = tl.load(max_ptr + row)
    inv_t = tl.load(inv_t_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    kth = tl.load(kth_ptr + row)
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(BLOCKS_PER_PROGRAM):
        b = tl.program_id(1) * BLOCKS_PER_PROGRAM + i
        if b < blocks:
            cols = b * BLOCK + offs
            inside = cols < vocab
            logit = tl.load(logits_ptr + row * stride_l + cols, mask=inside, other=float("-inf"))
            e = tl.exp((logit - top) * inv_t)
            e = tl.where(inside & (e >= min_p) & (logit >= kth), e, 0.0)
            tl.store(e_ptr + row * stride_e + cols, e)
            tl.store(sums_ptr + row * stride_s + b, tl.sum(e, axis=0))


@triton.jit
def _sums_above_kernel(
    e_ptr, rows_ptr, pivot_ptr, sums_ptr, stride_e, stride_s, blocks,
    BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    pivot = tl.load(pivot_ptr + i)
    offs = tl.arange(0, BLOCK)
    for j in tl.static_range(BLOCKS_PER_PROGRAM):
        b = tl.program_id(1) * BLOCKS_PER_PROGRAM + j
        if b < blocks:
            e = tl.load(e_ptr + row * stride_e + b * BLOCK + offs)
            tl.store(sums_ptr + i * stride_s + b, tl.sum(tl.where(e > pivot, e, 0.0), axis=0))


def tempered(
    logits: torch.Tensor,
    top: torch.Tensor,
    inv_temperature: torch.Tensor,
    min_p: torch.Tensor,
    kth: torch.Tensor,
    out: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """logits (n, vocab) fp32; per row its largest logit, 1 / temperature, min-p floor (0: none) and k-th largest logit
    (-inf: no top-k), each (n,) fp32 -> out (n, width) filled with the truncated `e` (0 past the vocabulary) and
    returned with its block sums (n, width / block)."""
    if logits.stride(1) != 1:  # the kernel steps through a row's entries one by one
        logits = logits.contiguous()
    n, vocab = logits.shape
    blocks = out.shape[1] // block
    sums = torch.empty((n, blocks), dtype=torch.float32, device=logits.device)
    if n:
        grid = (n, triton.cdiv(blocks, BLOCKS_PER_PROGRAM))
        _tempered_kernel[grid](
            logits, top, inv_temperature, min_p, kth, out, sums,
            logits.stride(0), out.stride(0), sums.stride(0), vocab, blocks,
            BLOCK=block, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
        )  # fmt: skip
    return sums


def sums_above(e: torch.Tensor, rows: torch.Tensor, pivot: torch.Tensor, block: int) -> torch.Tensor:
    """e (N, width) >= 0, rows (m,) int64 into it and pivot (m,) fp32 -> (m, width / block): per row `rows[i]` the
    sums of each block's entries greater than pivot[i]."""
    m = rows.shape[0]
    blocks = e.shape[1] // block
    sums = torch.empty((m, blocks), dtype=torch.float32, device=e.device)
    if m:
        grid = (m, triton.cdiv(blocks, BLOCKS_PER_PROGRAM))
        _sums_above_kernel[grid](
            e, rows, pivot, sums, e.stride(0), sums.stride(0), blocks,
            BLOCK=block, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
        )  # fmt: skip
    return sums
