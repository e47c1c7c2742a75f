"""Paged attention over a flat batch of tokens from many sequences.

The KV cache of a layer is `k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim)`; a sequence owns a
list of blocks (its block table) and its token at position p lives in block `table[p // block_size]`, offset
`p % block_size`. A step's tokens are flat (T,): chunks of prompts being prefilled and single decode tokens side by
side. New keys/values are written at their cache slots first, then each sequence attends over its whole context,
gathered from its blocks. The gather is exact (no approximation), which is what the CPU and the parity tests need;
the GPU speed path is the kernel issue's work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BatchContext:
    """What every layer needs to know about a step's flat batch of T tokens."""

    kv_index: torch.Tensor  # (T,) flat cache index (block * block_size + offset) where each new token's K/V goes
    token_slots: torch.Tensor | None  # (T,) adapter slot per token, -1 = base only; None = no adapter in the batch
    query_ranges: list[tuple[int, int]]  # per sequence: [start, end) of its tokens in the flat batch
    context_index: list[torch.Tensor]  # per sequence: (ctx_len,) flat cache indices of its whole context, in order


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
    """k, v (T, n_kv, hd) written at flat positions `index` (T,) of the (num_blocks, block_size, n_kv, hd) caches."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, index, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, index, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: BatchContext, n_kv_heads: int
) -> torch.Tensor:
    """q (T, n_heads, hd) -> (T, n_heads, hd), causal within each sequence, over keys already stored in the cache."""
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # (num_blocks * block_size, n_kv, hd)
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    out = torch.empty_like(q)
    gqa = q.shape[1] != n_kv_heads
    for (start, end), index in zip(ctx.query_ranges, ctx.context_index, strict=True):
        n, ctx_len = end - start, index.shape[0]
        qs = q[start:end].transpose(0, 1)[None]  # (1, H, n, hd)
        ks = k_flat[index].transpose(0, 1)[None]  # (1, KVH, ctx_len, hd)
        vs = v_flat[index].transpose(0, 1)[None]
        mask = None
        if n > 1:
            # the chunk's query i sits at position ctx_len - n + i and sees keys j <= that position
            mask = torch.ones(n, ctx_len, dtype=torch.bool, device=q.device).tril(diagonal=ctx_len - n)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out
