"""Paged attention over a flat batch of tokens from many sequences.

The KV cache of a layer is `k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim)`; a sequence owns a
list of blocks (its block table) and its token at position p lives in block `table[p // block_size]`, offset
`p % block_size`. A step's tokens are flat (T,): chunks of prompts being prefilled and single decode tokens side by
side. New keys/values are written at their cache slots first, then each sequence attends over its whole context,
gathered from its blocks. The gather is exact (no approximation), which is what the CPU and the parity tests need.

A batch of decode tokens only (one new token per sequence, the common step) takes `paged_decode_attention`: padded
block tables and context lengths as tensors, one call for the whole batch (on the GPU a Triton kernel reading the
blocks in place; elsewhere one gather and one SDPA call), no Python loop over sequences and no host
synchronisation, so that the step can be captured in a CUDA graph. In other steps the decode
tokens take the same call, the prompts' first chunks one padded causal SDPA call (`PrefillBatch`), and only chunks
that continue a prompt are attended one sequence at a time: the per-layer host work does not grow with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from loramux.server.transfer import to_device

if TYPE_CHECKING:
    from loramux.server.layers.lora_kernels import Segments

# The SDPA backends the batched causal attention of prompts' first chunks may take (torch picks among them). cuDNN's
# is left out: on an H200 (torch 2.11) it spent 42-100 ms of host time building a plan the first time it met each
# (prompts, length) shape, which most steps under changing load do, against 0-2.4 ms for flash attention on the same
# machine. A chunk that continues a prompt has a causal mask aligned to its context's end (`causal_lower_right`),
# which flash attention takes as it is. Given as a boolean mask and left to torch's choice, that call took 1-2 s of
# host time in some steps (H200, the 8B shape; a cost like cuDNN's plan building above, in every layer), paid by
# every first token of a burst of prompts.
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    # In a mixed step, `decode_rows` (D,) are the flat indices of its decode tokens, and `block_tables` (D, width) and
    # `context_lens` (D,) describe those rows only; `prefill` batches its whole-prompt chunks. `query_ranges` and
    # `context_index` then list the remaining sequences (chunks that continue a prompt), attended one by one.
    decode_rows: torch.Tensor | None = None
    prefill: PrefillBatch | None = None


@dataclass
class PrefillBatch:
    """F sequences whose context is exactly their chunk in this step (a prompt's first chunk), padded to L tokens so
    that one causal SDPA call covers all of them. Padding repeats a sequence's first token and sits after its real
    tokens, where causality hides it from every real query."""

    tokens: torch.Tensor  # (F, L) flat batch index of each query token
    cache_index: torch.Tensor  # (F, L) flat cache index of each key/value
    rows: torch.Tensor  # (N,) which of the F * L padded rows are real tokens
    targets: torch.Tensor  # (N,) their flat batch index

    @staticmethod
    def build(ranges: list[tuple[int, int]], cache_index: list[torch.Tensor], device: torch.device) -> PrefillBatch:
        """From each sequence's [start, end) in the flat batch and the (n,) cache indices of its n tokens."""
        width = max(end - start for start, end in ranges)
        tokens = torch.empty(len(ranges), width, dtype=torch.long)
        index = torch.empty(len(ranges), width, dtype=torch.long)
        rows, targets = [], []
        for i, ((start, end), where) in enumerate(zip(ranges, cache_index, strict=True)):
            n = end - start
            tokens[i, :n] = torch.arange(start, end)
            tokens[i, n:] = start
            index[i, :n] = where
            index[i, n:] = where[0]
            rows.append(torch.arange(i * width, i * width + n))
            targets.append(torch.arange(start, end))
        return PrefillBatch(*to_device([tokens, index, torch.cat(rows), torch.cat(targets)], device))


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
    """k, v (T, n_kv, hd) written at flat positions `index` (T,) of the (num_blocks, block_size, n_kv, hd) caches."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, index, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, index, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: BatchContext, n_kv_heads: int
) -> torch.Tensor:
    """q (T, n_heads, hd) -> (T, n_heads, hd), causal within each sequence, over keys already stored in the cache."""
    if ctx.block_tables is not None and ctx.decode_rows is None:
        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # (num_blocks * block_size, n_kv, hd)
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    out = torch.empty_like(q)
    gqa = q.shape[1] != n_kv_heads
    if ctx.decode_rows is not None:
        rows = ctx.decode_rows
        out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, ctx.block_tables, ctx.context_lens)
    if ctx.prefill is not None:
        p = ctx.prefill
        f, width = p.tokens.shape
        qs = q[p.tokens].transpose(1, 2)  # (F, H, L, hd)
        ks = k_flat[p.cache_index].transpose(1, 2)  # (F, KVH, L, hd)
        vs = v_flat[p.cache_index].transpose(1, 2)
        with sdpa_kernel(_PREFILL_BACKENDS):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        out[p.targets] = o.transpose(1, 2).reshape(f * width, *q.shape[1:])[p.rows]
    for (start, end), index in zip(ctx.query_ranges, ctx.context_index, strict=True):
        n, ctx_len = end - start, index.shape[0]
        qs = q[start:end].transpose(0, 1)[None]  # (1, H, n, hd)
        ks = k_flat[index].transpose(0, 1)[None]  # (1, KVH, ctx_len, hd)
        vs = v_flat[index].transpose(0, 1)[None]
        # the chunk's query i sits at position ctx_len - n + i and sees keys j <= that position
        mask = causal_lower_right(n, ctx_len) if n > 1 else None
        with sdpa_kernel(_PREFILL_BACKENDS):
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
    context_lens[b] cache positions of its block table (B, max_blocks). Shapes depend only on B and max_blocks.

    On the GPU a Triton kernel reads the blocks in place; elsewhere the blocks are gathered into a padded tensor for
    one SDPA call."""
    if q.is_cuda:
        from loramux.server.layers.attention_kernels import paged_decode_attention as triton_decode

        return triton_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """`paged_decode_attention` through a gather of each sequence's padded K/V and one SDPA call (any device)."""
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
