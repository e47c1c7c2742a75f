"""Turning a row of logits into the next token, per request: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """logits (vocab,) fp32 -> a token id. temperature 0 is greedy; top_k <= 0 and top_p >= 1 switch those off.

    Each request draws from its own generator, so a seeded request samples the same tokens whatever its batch mates.
    """
    if temperature <= 0.0 or top_k == 1:
        return int(torch.argmax(logits))
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sample_tokens(
    rows: list[torch.Tensor], settings: list[tuple[float, int, float, torch.Generator | None]]
) -> list[int]:
    """One token per row: rows[i] (vocab,) with settings[i] = (temperature, top_k, top_p, generator).

    The greedy rows are decided together, one argmax and one transfer to the host for all of them, instead of one
    synchronising `.item()` per request; the others sample one by one, each from its own generator.
    """
    tokens: list[int | None] = [None] * len(rows)
    greedy = [i for i, (temperature, top_k, _, _) in enumerate(settings) if temperature <= 0.0 or top_k == 1]
    if greedy:
        picked = torch.stack([rows[i] for i in greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, picked, strict=True):
            tokens[i] = token
    for i, (temperature, top_k, top_p, generator) in enumerate(settings):
        if tokens[i] is None:
            tokens[i] = sample_token(rows[i], temperature, top_k, top_p, generator)
    return tokens  # type: ignore[return-value]
