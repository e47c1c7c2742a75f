"""The torch reference of multi-slot LoRA against the plain per-token formula."""

from __future__ import annotations

import torch

from loramux.server.layers.lora import LoraLinear, expand, shrink


def test_shrink_expand_match_per_token_lora_with_padding_and_base_rows():
    torch.manual_seed(0)
    tokens, d_in, d_out, r_max = 7, 12, 10, 8
    ranks = [8, 3, 5]  # slots with a rank below r_max are zero-padded
    a_true = [torch.randn(r, d_in) for r in ranks]
    b_true = [torch.randn(d_out, r) for r in ranks]
    a = torch.zeros(len(ranks), r_max, d_in)
    b = torch.zeros(len(ranks), d_out, r_max)
    for s, r in enumerate(ranks):
        a[s, :r], b[s, :, :r] = a_true[s], b_true[s]
    scalings = torch.tensor([0.5, 2.0, 1.25])
    x = torch.randn(tokens, d_in)
    token_slots = torch.tensor([2, -1, 0, 2, 1, -1, 0])
    y0 = torch.randn(tokens, d_out)

    h = shrink(x, a, token_slots)
    assert h.shape == (tokens, r_max)
    assert torch.equal(h[token_slots == -1], torch.zeros(2, r_max))
    y = y0.clone()
    expand(y, h, b, token_slots, scalings)

    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            assert torch.equal(y[t], y0[t])  # base-only tokens are untouched
        else:
            expected = y0[t] + scalings[s] * (x[t] @ a_true[s].T) @ b_true[s].T
            torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=1e-5)


def test_lora_linear_slots_add_and_clear():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    layer = LoraLinear(weight, None, torch.float32)
    x = torch.randn(3, 64)
    plain = layer(x)
    layer.allocate_slots(num_slots=2, max_rank=4)
    a, b = torch.randn(2, 64), torch.randn(16, 2)
    layer.write_slot(1, a, b, 3.0)
    slots = torch.tensor([1, -1, 0])
    out = layer(x, slots)
    torch.testing.assert_close(out[0], plain[0] + 3.0 * (x[0] @ a.T) @ b.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:], plain[1:])  # base-only and an empty slot add nothing
    assert layer.ranks.tolist() == [0, 2]
    layer.write_slot(1, None, None, 0.0)
    torch.testing.assert_close(layer(x, slots), plain)
