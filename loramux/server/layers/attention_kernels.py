"""Triton paged decode attention for the GPU: one query token per sequence, keys and values read in place from the
KV cache's blocks (no gather into a padded copy), online softmax, grouped-query heads sharing each K/V load.

One program takes one (sequence, KV head): the `group` query heads of that KV head against the sequence's first
`context_lens[b]` cache positions, `BLOCK_N` positions at a time, each looked up through the block table. Work and
bytes follow each sequence's own context length, not the widest one in the batch, and the block-table width is
only a stride: a CUDA graph captured for a batch size serves every context length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # cache positions per iteration


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh, scale,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + b).to(tl.int32)
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        blocks = tl.load(tables_ptr + b * stride_tb + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        where = (blocks * BLOCK_SIZE + offs_n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh  # (BLOCK_N,)
        k = tl.load(k_ptr + where[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)  # (BLOCK_N, D)
        scores = tl.dot(q, tl.trans(k)) * scale  # (GROUP_PAD, BLOCK_N), fp32
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + where[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / total[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """q (B, n_heads, hd) -> (B, n_heads, hd); what `attention.paged_decode_attention` computes, on the GPU.

    k_cache, v_cache: (num_blocks, block_size, n_kv, hd), contiguous; block_tables (B, width); context_lens (B,) >= 1.
    """
    b, n_heads, hd = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"head dimension {hd} is not a power of two of at least 16")
    group = n_heads // n_kv
    out = torch.empty_like(q)
    if b == 0:
        return out
    k_flat = k_cache.view(-1, n_kv, hd)
    v_flat = v_cache.view(-1, n_kv, hd)
    _paged_decode_kernel[(b, n_kv)](
        q, k_flat, v_flat, block_tables, context_lens, out,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), hd**-0.5,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd,
        BLOCK_N=BLOCK_N, num_warps=4,
    )  # fmt: skip
    return out
