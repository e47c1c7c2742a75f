"""Paged attention of chunks that continue a prompt: each query sees its context up to its own position."""

from __future__ import annotations

import pytest
import torch

from loramux.server.layers.attention import BatchContext, paged_attention


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q (n, H, hd) at the last n positions of a context of keys/values (ctx, KVH, hd), written out in full."""
    n, heads, hd = q.shape
    ctx_len, group = keys.shape[0], heads // keys.shape[1]
    k, v = keys.repeat_interleave(group, dim=1).float(), values.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("nhd,chd->hnc", q.float(), k) / hd**0.5
    visible = torch.arange(ctx_len)[None, :] <= (ctx_len - n + torch.arange(n))[:, None]  # (n, ctx)
    weights = scores.masked_fill(~visible.to(q.device), float("-inf")).softmax(dim=-1)
    return torch.einsum("hnc,chd->nhd", weights, v)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_continued_chunks_see_their_context_up_to_their_own_position(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    num_blocks, block_size, n_kv, n_heads, hd = 16, 16, 2, 8, 64
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd, device=device, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd, device=device, dtype=dtype)
    # two sequences: 7 new tokens after 30 cached, 12 new after 21 (blocks scattered); the second attends alone
    tables, lengths, news = [[5, 2, 9], [11, 0, 14]], [37, 33], [7, 12]
    index = [
        (torch.tensor(t)[:, None] * block_size + torch.arange(block_size)).flatten()[:length].to(device)
        for t, length in zip(tables, lengths, strict=True)
    ]
    q = torch.randn(sum(news), n_heads, hd, device=device, dtype=dtype)
    ranges = [(0, news[0]), (news[0], sum(news))]
    ctx = BatchContext(kv_index=torch.zeros(sum(news), dtype=torch.long, device=device), token_slots=None,
                       query_ranges=ranges, context_index=index)  # fmt: skip
    got = paged_attention(q, k_cache, v_cache, ctx, n_kv)
    k_flat, v_flat = k_cache.view(-1, n_kv, hd), v_cache.view(-1, n_kv, hd)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for (start, end), where in zip(ranges, index, strict=True):
        expected = reference(q[start:end], k_flat[where], v_flat[where])
        torch.testing.assert_close(got[start:end].float(), expected, **tolerance)
