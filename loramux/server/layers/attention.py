"""Paged attention over a flat batch of tokens from many sequences.

The KV cache of a layer is `k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim)`; a sequence owns a
list of blocks (its block table) and its token at position p lives in block `table[p // block_size]`, offset
`p % block_size`. A step's tokens are flat (T,): chunks of prompts being prefilled and single decode tokens side by
side. New keys/values are written at their cache slots first, then each sequence attends over its whole context,
gathered from its blocks. The gather is exact (no approximation), which is what the CPU and the parity tests need.

A batch of decode tokens only (one new token per sequence, the common step) takes `paged_decode_attention`: padded
block tables and context lengths as tensors, one gather and one SDPA call for the whole batch, no Python loop over
sequences and no host synchronisation, so that the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from loramux.server.layers.lora_kernels import Segments


@dataclass
class BatchContext:
    """What every layer needs to know about a step's flat batch of T tokens."""

    kv_index: torch.Tensor  # (T,) flat cache index (block * block_size + offset) where each new token's K/V goes
    token_slots: torch.Tensor | None  # (T,) adapter slot per token, -1 = base only; None = no adapter in the batch
    query_ranges: list[tuple[int, int]]  # per sequence: [start, end) of its tokens in the flat batch
    context_index: list[torch.Tensor]  # per sequence: (ctx_len,) flat cache indices of its whole context, in order
    # Decode-only batches (token i is sequence i's one new token) may give these instead of the two lists above:
    block_tables: torch.Tensor | None = None  # (T, max_blocks) int32/int64, padded with any valid block
    context_lens: torch.Tensor | None = None  # (T,) tokens of each sequence in the cache, its new one included
    segments: Segments | None = None  # tokens grouped by adapter slot for the GPU LoRA kernels, planned once a step


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
    """k, v (T, n_kv, hd) written at flat positions `index` (T,) of the (num_blocks, block_size, n_kv, hd) caches."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, index, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, index, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: BatchContext, n_kv_heads: int
) -> torch.Tensor:
    """q (T, n_heads, hd) -> (T, n_heads, hd), causal within each sequence, over keys already stored in the cache."""
    if ctx.block_tables is not None:
        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens)
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


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """One query per sequence: q (B, n_heads, hd) -> (B, n_heads, hd), sequence b attending over the first
    context_lens[b] cache positions of its block table (B, max_blocks). Shapes depend only on B and max_blocks."""
    b, n_heads, hd = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    k_flat = k_cache.view(-1, n_kv, hd)  # (num_blocks * block_size, n_kv, hd)
    v_flat = v_cache.view(-1, n_kv, hd)
    offsets = torch.arange(block_size, device=q.device, dtype=block_tables.dtype)
    index = (block_tables[:, :, None] * block_size + offsets).flatten(1)  # (B, L), L = max_blocks * block_size
    keys = k_flat[index].transpose(1, 2)  # (B, n_kv, L, hd)
    values = v_flat[index].transpose(1, 2)
    visible = torch.arange(index.shape[1], device=q.device) < context_lens[:, None]  # (B, L)
    # GQA without repeating K/V: the n_heads / n_kv query heads of a KV head are that head's "queries" (heads are
    # grouped as in Hugging Face's repeat_kv: query head h reads KV head h // group).
    queries = q.view(b, n_kv, n_heads // n_kv, hd)  # (B, n_kv, group, hd)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible[:, None, None, :])
    return out.reshape(b, n_heads, hd)
