"""The sampler's Triton passes against the torch ops they stand for (the sampler's own tests check what it draws)."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from loramux.server.layers.sampler import block_size

TRITON = find_spec("triton") is not None
if TRITON:
    from loramux.server.layers import sampler_kernels as sk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not TRITON, reason="needs Triton")]

DEVICE = "cuda"


@pytest.mark.parametrize("vocab", [1000, 49152, 128256])
def test_tempered_is_the_truncated_exponential_and_its_block_sums(vocab: int) -> None:
    torch.manual_seed(vocab)
    block = block_size(vocab)
    width = -(-vocab // block) * block
    n = 6
    logits = torch.randn(n, vocab, device=DEVICE) * 3
    logits[1, 5] = -torch.inf  # a banned token
    top = logits.max(dim=-1).values
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1e-4], device=DEVICE)
    min_p = torch.tensor([0.0, 0.1, 0.0, 0.0, 0.05, 0.0], device=DEVICE)
    kth = torch.full((n,), -torch.inf, device=DEVICE)
    kth[2] = logits[2].topk(5).values[-1]
    kth[4] = logits[4].topk(50).values[-1]
    out = torch.full((n, width), 7.0, device=DEVICE)  # garbage the kernel must overwrite, past the vocabulary too

    sums = sk.tempered(logits, top, 1.0 / temperature, min_p, kth, out, block)

    want = torch.exp((logits.double() - top.double()[:, None]) / temperature.double()[:, None])
    want = torch.where((want >= min_p.double()[:, None]) & (logits >= kth[:, None]), want, 0.0)
    kept = out[:, :vocab] > 0
    assert torch.equal(kept, want > 0)  # the same tokens truncated (no setting sits at a rounding edge here)
    torch.testing.assert_close(out[:, :vocab].double(), want, rtol=1e-5, atol=1e-30)
    assert (out[:, vocab:] == 0).all()
    assert kept[2].sum() == 5 and 0 < kept[4].sum() <= 50 and kept[5, logits[5].argmax()] and not kept[1, 5]
    torch.testing.assert_close(sums, out.view(n, -1, block).sum(dim=-1), rtol=1e-5, atol=1e-6)


def test_sums_above_counts_only_entries_above_each_rows_pivot() -> None:
    torch.manual_seed(0)
    vocab, n = 5000, 5
    block = block_size(vocab)
    width = -(-vocab // block) * block
    e = torch.rand(n, width, device=DEVICE) * (torch.rand(n, width, device=DEVICE) > 0.3)
    e[:, vocab:] = 0
    rows = torch.tensor([3, 0, 3, 4], device=DEVICE)  # a row twice, rows out of order
    pivot = torch.tensor([0.5, 0.0, 0.99, 2.0], device=DEVICE)  # 2.0: above every entry

    got = sk.sums_above(e, rows, pivot, block)

    picked = e[rows]
    want = torch.where(picked > pivot[:, None], picked, 0.0).view(len(rows), -1, block).sum(dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[3] == 0).all()
    torch.testing.assert_close(got[1].sum(), picked[1].sum())  # pivot 0 keeps every positive entry
