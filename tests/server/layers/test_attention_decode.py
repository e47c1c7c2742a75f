"""The batched decode attention (padded block tables, one SDPA call) against the per-sequence paged attention."""

from __future__ import annotations

import torch

from loramux.server.layers.attention import BatchContext, paged_attention, paged_decode_attention


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
