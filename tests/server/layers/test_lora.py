"""The torch reference of multi-slot LoRA against the plain per-token formula."""

from __future__ import annotations

import torch

from loramux.server.layers.lora import LoraGroup, LoraLinear, expand, shrink
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.layers.slots import SlotLayout


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
    layer.allocate_slots(SlotLayout.of(num_slots=2, max_rank=4))
    a, b = torch.randn(2, 64), torch.randn(16, 2)
    layer.write_slot(1, a, b, 3.0)
    slots = torch.tensor([1, -1, 0])
    out = layer(x, slots)
    torch.testing.assert_close(out[0], plain[0] + 3.0 * (x[0] @ a.T) @ b.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:], plain[1:])  # base-only and an empty slot add nothing
    assert layer.ranks.tolist() == [0, 2]
    layer.write_slot(1, None, None, 0.0)
    torch.testing.assert_close(layer(x, slots), plain)


def test_a_smaller_adapter_in_a_used_slot_reads_nothing_of_the_larger_one():
    torch.manual_seed(2)
    layer = LoraLinear(torch.randn(16, 64), None, torch.float32)
    q, v = LoraLinear(torch.randn(8, 64), None, torch.float32), LoraLinear(torch.randn(8, 64), None, torch.float32)
    group = LoraGroup([q, v])
    layer.allocate_slots(SlotLayout.of(num_slots=2, max_rank=8))
    group.allocate_slots(SlotLayout.of(num_slots=2, max_rank=8))
    x, slots = torch.randn(3, 64), torch.tensor([0, 0, 0])
    for target in (layer, q, v):
        target.write_slot(0, torch.randn(8, 64), torch.randn(target.out_features, 8), 1.0)  # rank 8 first
    for target in (layer, q, v):
        plain = NF4Linear.forward(target, x)
        a, b = torch.randn(3, 64), torch.randn(target.out_features, 3)
        target.write_slot(0, a, b, 2.0)  # then rank 3 in the same slot: rows 3..7 still hold the rank-8 adapter's
        expected = plain + 2.0 * (x @ a.T) @ b.T
        out = target(x, slots) if target is layer else group(x, slots)[[q, v].index(target)]
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert layer.ranks.tolist() == [3, 0] and group.ranks.tolist() == [[3, 3], [0, 0]]


def fill_memory(view: torch.Tensor, value: float) -> None:
    """Fill the whole memory behind a view (the slot memory, not only what the view's pages show)."""
    view.as_strided((view.untyped_storage().nbytes() // view.element_size(),), (1,), 0).fill_(value)


def test_adapters_of_several_ranks_share_a_slot_and_read_only_their_own_rows():
    """Slot memory of one rank-32 slot (4 pages of 8) holds a rank-8, a rank-3 and a rank-16 adapter side by side;
    everything else in the memory is NaN, so a read past any adapter's rank would show."""
    torch.manual_seed(3)
    layer = LoraLinear(torch.randn(16, 64), None, torch.float32)
    q, v = LoraLinear(torch.randn(8, 64), None, torch.float32), LoraLinear(torch.randn(24, 64), None, torch.float32)
    group = LoraGroup([q, v])
    for target in (layer, group):
        target.allocate_slots(SlotLayout.of(num_slots=1, max_rank=32))
    for view in (layer.lora_a, layer.lora_b, group.lora_a, q.lora_b, v.lora_b):
        fill_memory(view, float("nan"))
    # first page of each adapter -> rank; an empty rank means the module is not targeted
    adapters = {0: 8, 1: 3, 2: 16}
    written = {}
    for page, rank in adapters.items():
        for target in (layer, q, v):
            if target is v and page == 1:
                target.write_slot(page, None, None, 0.0)  # this adapter does not target v
                continue
            a, b = torch.randn(rank, 64), torch.randn(target.out_features, rank)
            target.write_slot(page, a, b, 0.5 + page)
            written[id(target), page] = (a, b, 0.5 + page)
    x = torch.randn(7, 64)
    slots = torch.tensor([2, -1, 0, 1, 2, 0, 1])
    outs = {id(layer): layer(x, slots), **{id(m): y for m, y in zip((q, v), group(x, slots), strict=True)}}
    for target in (layer, q, v):
        plain = NF4Linear.forward(target, x)
        for t, page in enumerate(slots.tolist()):
            expected = plain[t]
            if (id(target), page) in written:
                a, b, scaling = written[id(target), page]
                expected = plain[t] + scaling * (x[t] @ a.T) @ b.T
            torch.testing.assert_close(outs[id(target)][t], expected, atol=1e-4, rtol=1e-4)
    assert layer.ranks.tolist()[:3] == [8, 3, 16] and group.ranks[:3].tolist() == [[8, 8], [3, 0], [16, 16]]
