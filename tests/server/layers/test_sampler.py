"""Per-request sampling: greedy, top-k, top-p, seeds."""

from __future__ import annotations

import torch

from loramux.server.layers.sampler import sample_token, sample_tokens


def draws(logits: torch.Tensor, n: int = 300, **kwargs) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return {sample_token(logits, generator=g, **kwargs) for _ in range(n)}


def test_greedy_and_top_k_one_take_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, 0.0, 0, 1.0, None) == 1
    assert draws(logits, temperature=1.0, top_k=1, top_p=1.0) == {1}


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert draws(logits, temperature=1.0, top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert draws(logits, temperature=1.0, top_k=2, top_p=1.0) == {0, 1}
    assert draws(logits, temperature=1.0, top_k=0, top_p=0.65) == {0, 1}  # 0.4 + 0.3 reaches 0.65
    assert draws(logits, temperature=1.0, top_k=0, top_p=0.3) == {0}


def test_same_seed_same_tokens():
    logits = torch.randn(50)

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample_token(logits, 1.0, 0, 1.0, g) for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_batch_samples_each_row_as_it_would_alone():
    torch.manual_seed(0)
    rows = [torch.randn(50) for _ in range(5)]
    settings = [(0.0, 0, 1.0, None), (0.8, 10, 0.9, 7), (0.0, 0, 1.0, None), (1.0, 1, 1.0, None), (1.2, 0, 0.5, 3)]

    def generator(seed):
        return None if seed is None else torch.Generator().manual_seed(seed)

    together = sample_tokens(rows, [(t, k, p, generator(s)) for t, k, p, s in settings])
    alone = [sample_token(row, t, k, p, generator(s)) for row, (t, k, p, s) in zip(rows, settings, strict=True)]
    assert together == alone
    assert together[0] == int(rows[0].argmax()) and together[3] == int(rows[3].argmax())
