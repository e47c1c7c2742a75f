"""Batched attention (decode tokens through padded block tables, whole prompts in one padded causal call)
against the per-sequence paged attention."""

from __future__ import annotations

import itertools

import pytest
import torch

from loramux.server.layers.attention import (
    BatchContext,
    PrefillBatch,
    paged_attention,
    paged_decode_attention,
    paged_decode_attention_torch,
)


def test_decode_attention_matches_per_sequence_attention_with_gqa_and_padding():
    torch.manual_seed(0)
    num_blocks, block_size, n_kv, n_heads, hd = 12, 4, 2, 6, 8
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd)
    # three sequences of 1, 6 and 9 cached tokens (their new token included), blocks scattered in the cache
    tables = [[7], [2, 9], [11, 0, 5]]
    lens = [1, 6, 9]
    q = torch.randn(3, n_heads, hd)
    index = [
        (torch.tensor(t)[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        for t, n in zip(tables, lens, strict=True)
    ]
    ctx = BatchContext(kv_index=torch.zeros(3, dtype=torch.long), token_slots=None,
                       query_ranges=[(0, 1), (1, 2), (2, 3)], context_index=index)  # fmt: skip
    expected = paged_attention(q, k_cache, v_cache, ctx, n_kv)
    # padded to 4 blocks with a block no sequence owns: the context lengths mask it out
    padded = torch.tensor([t + [3] * (4 - len(t)) for t in tables])
    got = paged_decode_attention(q, k_cache, v_cache, padded, torch.tensor(lens))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the same through BatchContext's decode fields
    decode_ctx = BatchContext(kv_index=ctx.kv_index, token_slots=None, query_ranges=[], context_index=[],
                              block_tables=padded, context_lens=torch.tensor(lens))  # fmt: skip
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, decode_ctx, n_kv), expected, rtol=1e-5, atol=1e-5)


def test_a_mixed_step_batched_by_kind_matches_per_sequence_attention():
    """Two whole prompts of 3 and 5 tokens (one padded batch), a decode token and a prompt's second chunk (alone)."""
    torch.manual_seed(1)
    num_blocks, block_size, n_kv, n_heads, hd = 16, 4, 2, 6, 8
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd)
    tables = [[4, 1], [6, 13], [3, 8, 10], [2, 12]]
    starts, counts = [0, 0, 8, 4], [3, 5, 1, 3]  # sequence i computes counts[i] tokens from position starts[i]
    index = [
        (torch.tensor(t)[:, None] * block_size + torch.arange(block_size)).flatten()[: s + n]
        for t, s, n in zip(tables, starts, counts, strict=True)
    ]
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    ranges = list(itertools.pairwise(bounds))
    q = torch.randn(bounds[-1], n_heads, hd)
    kv_index = torch.cat([ix[s:] for ix, s in zip(index, starts, strict=True)])
    one_by_one = BatchContext(kv_index=kv_index, token_slots=None, query_ranges=ranges, context_index=index)
    expected = paged_attention(q, k_cache, v_cache, one_by_one, n_kv)

    by_kind = BatchContext(
        kv_index=kv_index,
        token_slots=None,
        query_ranges=[ranges[3]],
        context_index=[index[3]],
        block_tables=torch.tensor([tables[2]]),
        context_lens=torch.tensor([starts[2] + 1]),
        decode_rows=torch.tensor([ranges[2][0]]),
        prefill=PrefillBatch.build(ranges[:2], index[:2], torch.device("cpu")),
    )
    assert by_kind.prefill is not None and by_kind.prefill.tokens.shape == (2, 5)
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, by_kind, n_kv), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "hd", "block_size"),
    [(32, 8, 128, 16), (8, 8, 64, 16), (12, 2, 64, 8), (16, 1, 128, 32), (9, 3, 32, 4)],
)
def test_the_triton_decode_kernel_matches_the_gather_path(n_heads, n_kv, hd, block_size):
    from loramux.server.layers import attention_kernels

    torch.manual_seed(n_heads + hd)
    num_blocks, batch, width = 96, 37, 20
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd, device="cuda", dtype=torch.bfloat16)
    lens = torch.randint(1, width * block_size + 1, (batch,), device="cuda")
    lens[:3] = torch.tensor([1, block_size, width * block_size])  # one position, one full block, the whole table
    tables = torch.randint(0, num_blocks, (batch, width), device="cuda")
    q = torch.randn(batch, n_heads, hd, device="cuda", dtype=torch.bfloat16)
    expected = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens)
    got = attention_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # entries of a table past a sequence's length are never read: scribbling over them changes nothing
    used = (lens[:, None] + block_size - 1) // block_size > torch.arange(width, device="cuda")
    scribbled = torch.where(used, tables, torch.full_like(tables, 10**9))
    torch.testing.assert_close(attention_kernels.paged_decode_attention(q, k_cache, v_cache, scribbled, lens), got)
