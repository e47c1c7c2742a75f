"""Batched sampling: the distribution each row asked for (chi-square), greedy, seeds, penalties, logprobs, edges."""

from __future__ import annotations

import math

import pytest
import torch

from loramux.server.engine.request import SamplingParams
from loramux.server.layers import sampler as sampler_module
from loramux.server.layers.sampler import Sampler

# On a GPU the sampler's passes are Triton kernels (`sampler_kernels.py`); the CPU runs the same steps in torch.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# The chi-square distribution's upper 0.1% points by degrees of freedom: a correct sampler fails one test in a
# thousand by chance, and the seeds below are fixed, so a run is deterministic.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59}


class Row:
    """What the sampler reads of a request."""

    def __init__(self, prompt_ids=(), output_ids=(), **params) -> None:
        self.params = SamplingParams(**params)
        self.prompt_ids = list(prompt_ids)
        self.output_ids = list(output_ids)
        self.generator = None


def intended(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The distribution the sampler's docstring promises, computed the plain way: softmax, then a full sort."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if 0 < top_k < len(probs):
        probs = torch.where(probs >= probs.topk(top_k).values[-1], probs, 0.0)
    probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    if top_p < 1.0:
        total = probs.sum()
        above = torch.tensor([probs[probs > p].sum() for p in probs], dtype=probs.dtype)
        probs = torch.where(above < top_p * total, probs, 0.0)
    return probs / probs.sum()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """The statistic over the tokens of nonzero probability, and its degrees of freedom."""
    support = probs > 0
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


SETTINGS = {
    "temperature": {"temperature": 0.7},
    "top_k": {"temperature": 1.3, "top_k": 4},
    "top_p": {"temperature": 1.0, "top_p": 0.6},
    "min_p": {"temperature": 1.0, "min_p": 0.15},
    "all_three": {"temperature": 0.9, "top_k": 6, "top_p": 0.8, "min_p": 0.05},
    "top_k_at_least_the_vocabulary": {"temperature": 1.0, "top_k": 50},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounds", [sampler_module.TOP_P_ROUNDS, 1])
def test_unseeded_rows_follow_the_intended_distribution(monkeypatch, rounds, device):
    """Many rows of each setting in one batched call; each setting's counts against its distribution. With one round
    of top-p draws most top-p rows end in the exact fallback, which must give the same distribution."""
    monkeypatch.setattr(sampler_module, "TOP_P_ROUNDS", rounds)
    torch.manual_seed(1234)
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0])
    draws = 20_000
    rows = [Row(**settings) for settings in SETTINGS.values() for _ in range(draws)]
    tokens, _ = Sampler(8, device).sample(logits.expand(len(rows), -1).contiguous().to(device), rows)
    tokens = torch.tensor(tokens).view(len(SETTINGS), draws)
    for (name, settings), got in zip(SETTINGS.items(), tokens, strict=True):
        counts = torch.bincount(got, minlength=8).double()
        probs = intended(logits, **settings)
        assert counts[probs == 0].sum() == 0, (name, counts)  # nothing outside what the truncations keep
        statistic, df = chi_square(counts, probs)
        assert df == 0 or statistic < CHI2_999[df], (name, statistic, df, counts.tolist(), probs.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_a_wide_vocabulary_is_searched_right_across_its_blocks(device):
    """A vocabulary of several blocks, not a multiple of the block size: the mass sits on a few tokens far apart
    (first and last entries, both sides of a block boundary), everything else impossible."""
    vocab = 1000
    sampler = Sampler(vocab, device)
    assert vocab % sampler.block != 0 and vocab // sampler.block > 4
    places = [0, 97, sampler.block - 1, sampler.block, 500, 998, 999]
    logits = torch.full((vocab,), -math.inf)
    logits[places] = torch.tensor([0.5, 1.0, 0.2, 0.2, -0.3, 0.8, 0.1])
    torch.manual_seed(99)
    draws = 30_000
    tokens, _ = sampler.sample(logits.expand(draws, -1).contiguous().to(device), [Row(temperature=1.0)] * draws)
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    probs = intended(logits)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(places)
    statistic, df = chi_square(counts, probs)
    assert statistic < CHI2_999[df], (statistic, counts[places].tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax(device):
    torch.manual_seed(0)
    logits = (torch.randn(64, 300) * 4).to(device)
    rows = [Row(temperature=0.0) if i % 2 else Row(temperature=1.0, top_k=1, top_p=0.5) for i in range(64)]
    tokens, logprobs = Sampler(300, device).sample(logits, rows)
    assert tokens == logits.argmax(dim=-1).tolist() and logprobs == [None] * 64
    # Greedy beside sampled rows in one batch: the greedy ones still take the argmax.
    mixed = [Row(temperature=0.0), Row(temperature=1.5, seed=1), Row(temperature=0.0, top_p=0.3)]
    tokens, _ = Sampler(300, device).sample(logits[:3], mixed)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_sample_the_same_tokens_whatever_their_batch_mates(device):
    sampler = Sampler(50, device)
    torch.manual_seed(5)
    steps = [torch.randn(50) * 2 for _ in range(12)]  # the seeded request's logits, step by step

    def run(seed: int, mates: int, place: int) -> list[int]:
        row = Row(temperature=1.0, top_p=0.9, top_k=20, seed=seed)
        out = []
        for logits in steps:  # its generator carries over from step to step, as on a request
            others = [Row(temperature=1.0, seed=None if j % 2 else 100 + j, min_p=0.1) for j in range(mates)]
            batch = torch.randn(mates + 1, 50) * 3
            batch[place] = logits
            requests = [*others[:place], row, *others[place:]]
            out.append(sampler.sample(batch.to(device), requests)[0][place])
        return out

    alone = run(7, 0, 0)
    assert run(7, 5, 3) == alone and run(7, 9, 9) == alone and run(7, 2, 0) == alone
    assert run(8, 4, 2) != alone  # another seed, other tokens (12 draws from a broad distribution)
    assert len(set(alone)) > 1  # it really sampled


def test_penalties_and_logit_bias_change_the_logits_as_specified():
    torch.manual_seed(3)
    vocab = 40
    logits = torch.randn(4, vocab) * 3
    rows = [
        Row(prompt_ids=[1, 2, 3, 3], output_ids=[3, 5, 5, 7], repetition_penalty=1.7),
        Row(prompt_ids=[1, 9], output_ids=[5, 5, 5, 8, 1], frequency_penalty=0.6, presence_penalty=-1.1),
        Row(prompt_ids=[4], output_ids=[4, 4], logit_bias={4: 100.0, 0: -50.5, 39: 2.25}),
        Row(prompt_ids=[2, 6], output_ids=[6, 6, 2], repetition_penalty=0.5, frequency_penalty=-2.0, logit_bias={6: 1}),
    ]
    expected = logits.clone()
    for row, want in zip(rows, expected, strict=True):
        p = row.params
        r = p.repetition_penalty
        for token in set(row.prompt_ids + row.output_ids):
            want[token] = want[token] / r if want[token] > 0 else want[token] * r
        for token in set(row.output_ids):
            want[token] -= p.frequency_penalty * row.output_ids.count(token) + p.presence_penalty
        for token, bias in p.logit_bias.items():
            want[token] += bias
    penalised = Sampler(vocab, "cpu").penalise(logits, rows)
    torch.testing.assert_close(penalised, expected)
    assert not torch.equal(penalised, logits)  # the caller's logits are left as they were
    # And sampling follows them: a +100 bias wins greedy decoding.
    assert Sampler(vocab, "cpu").sample(logits[2:3], [Row(temperature=0.0, logit_bias={11: 100.0})])[0] == [11]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_models_log_softmax_with_the_top_k(device):
    torch.manual_seed(11)
    vocab = 64
    logits = torch.randn(5, vocab) * 2
    rows = [
        Row(temperature=0.0, logprobs=5),
        Row(temperature=1.0, logprobs=None),
        Row(temperature=0.8, top_p=0.5, logprobs=0),
        Row(temperature=1.0, logprobs=20, logit_bias={3: 100.0}),  # biased: the logprobs stay the model's own
        Row(temperature=1.0, top_k=3, logprobs=2, seed=4),
    ]
    tokens, logprobs = Sampler(vocab, device).sample(logits.to(device), rows)
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[1] is None
    for i, (row, token, lp) in enumerate(zip(rows, tokens, logprobs, strict=True)):
        if row.params.logprobs is None:
            continue
        assert lp.logprob == pytest.approx(float(reference[i, token]), abs=1e-5)
        k = row.params.logprobs
        assert len(lp.top) == k
        values, ids = reference[i].topk(k) if k else (torch.tensor([]), torch.tensor([]))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert tokens[3] == 3 and tokens[0] == int(logits[0].argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    sampler = Sampler(30, device)
    torch.manual_seed(2)
    logits = (torch.randn(200, 30) * 2).to(device)
    argmax = logits.argmax(dim=-1).tolist()

    assert sampler.sample(torch.empty(0, 30, device=device), []) == ([], [])
    tiny_t, _ = sampler.sample(logits, [Row(temperature=1e-6)] * 200)
    assert tiny_t == argmax  # a temperature near 0 is greedy in effect, and nothing overflows into NaN
    tiny_p, _ = sampler.sample(logits, [Row(temperature=2.0, top_p=1e-6)] * 200)
    assert tiny_p == argmax  # the most likely token is always in the nucleus
    tiny_min_p, _ = sampler.sample(logits, [Row(temperature=2.0, min_p=1.0)] * 200)
    assert tiny_min_p == argmax
    huge_t, _ = sampler.sample(logits, [Row(temperature=100.0, top_k=30, top_p=0.999)] * 200)
    assert all(0 <= t < 30 for t in huge_t) and len(set(huge_t)) > 15
    greedy, logprobs = sampler.sample(logits[:3], [Row(temperature=0.0, logprobs=1)] * 3)
    assert greedy == argmax[:3] and all(lp is not None and len(lp.top) == 1 for lp in logprobs)
