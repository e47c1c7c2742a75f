"""The Triton LoRA kernels against a float64 torch reference written here: many shapes, ranks and slot mixes."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

# Triton comes with torch's CUDA build, not its CPU build: without it the kernels cannot be imported, and the tests
# are collected and skipped (as every `gpu` test is without a CUDA device).
TRITON = find_spec("triton") is not None
if TRITON:
    from loramux.server.layers import lora_kernels as lk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not TRITON, reason="needs Triton")]

DEVICE = "cuda"
PATHS = ("gather", "segment", "auto")
# bf16 operands accumulate in fp32; one bf16 rounding of the output is 2^-9 relative.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def update_err(y: torch.Tensor, y_in: torch.Tensor, y_ref: torch.Tensor) -> float:
    """Error of an in-place update measured against the update itself, so that y's own size cannot hide it."""
    return ((y.double() - y_ref).norm() / (y_ref - y_in.double()).norm().clamp_min(1e-30)).item()


def random_slots(tokens: int, num_slots: int, mix: str, gen: torch.Generator) -> torch.Tensor:
    """Slot per token: 'mixed' (some -1), 'one' (all tokens in one slot), 'none' (no adapter at all)."""
    if mix == "mixed":
        slots = torch.randint(-1, num_slots, (tokens,), generator=gen)
    elif mix == "one":
        slots = torch.full((tokens,), num_slots - 1)
    else:
        slots = torch.full((tokens,), -1)
    return slots.to(torch.int32).to(DEVICE)


def random_ranks(num_slots: int, r_max: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    """True ranks in [1, r_max] (some exactly r_max, some below), (S,) or (S, groups) with a 0 (module not targeted)."""
    shape = (num_slots,) if groups == 1 else (num_slots, groups)
    ranks = torch.randint(1, r_max + 1, shape, generator=gen)
    ranks.view(-1)[0] = r_max
    if groups > 1:
        ranks[-1, 1] = 0
    return ranks.to(torch.int32).to(DEVICE)


def rank_mask(ranks: torch.Tensor | None, num_slots: int, r_max: int, groups: int) -> torch.Tensor:
    """(S, groups·r_max) True where a row of A (column of B) lies within its slot's rank."""
    if ranks is None:
        return torch.ones(num_slots, groups * r_max, dtype=torch.bool, device=DEVICE)
    per_group = ranks.view(num_slots, -1).expand(num_slots, groups).long()  # (S, G)
    return (torch.arange(r_max, device=DEVICE)[None, None, :] < per_group[:, :, None]).reshape(num_slots, -1)


def padded(weights: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Fill what lies past each slot's rank with NaN: a kernel that reads padding it was told to skip fails."""
    shape = [weights.shape[0], 1, 1]
    shape[dim] = weights.shape[dim]
    return torch.where(valid.reshape(shape), weights, torch.full_like(weights, float("nan")))


def ref_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    a64 = torch.where(valid[:, :, None], a.double(), 0.0)  # (S, G·r, in), padding dropped
    h = torch.einsum("ti,tri->tr", x.double(), a64[slots.long().clamp(min=0)])
    return torch.where(slots[:, None] >= 0, h, 0.0)


def ref_expand(y, h, b, slots, scalings, valid_cols) -> torch.Tensor:
    b64 = torch.where(valid_cols[:, None, :], b.double(), 0.0)  # (S, out, r)
    idx = slots.long().clamp(min=0)
    delta = torch.einsum("tr,tor->to", h.double(), b64[idx]) * scalings.double()[idx][:, None]
    return torch.where(slots[:, None] >= 0, y.double() + delta, y.double())


CASES = [
    # tokens, in, out, slots S, r_max, slot mix, with ranks
    (1, 256, 128, 4, 16, "mixed", False),
    (7, 200, 72, 3, 8, "mixed", True),  # in, out not multiples of any block; r_max under the 16-wide tile
    (33, 512, 384, 8, 64, "mixed", True),
    (130, 128, 256, 1, 16, "mixed", False),  # a single slot
    (300, 320, 136, 16, 32, "mixed", True),  # T past GATHER_MAX_TOKENS and not a block multiple
    (257, 256, 128, 5, 16, "one", True),  # every token in one slot: one long segment
    (40, 128, 64, 4, 16, "none", False),  # no token has an adapter
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("tokens", "k", "n", "num_slots", "r_max", "mix", "with_ranks"), CASES)
def test_shrink_expand_match_reference(path, tokens, k, n, num_slots, r_max, mix, with_ranks):
    gen = torch.Generator().manual_seed(tokens * 1000 + k + n)
    dtype = torch.bfloat16
    slots = random_slots(tokens, num_slots, mix, gen)
    ranks = random_ranks(num_slots, r_max, 1, gen) if with_ranks else None
    valid = rank_mask(ranks, num_slots, r_max, 1)  # (S, r_max)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    a = padded(torch.randn(num_slots, r_max, k, generator=gen).to(DEVICE, dtype) / k**0.5, valid, 1)
    b = padded(torch.randn(num_slots, n, r_max, generator=gen).to(DEVICE, dtype), valid, 2)
    scalings = torch.rand(num_slots, generator=gen).to(DEVICE) + 0.5
    y = (torch.randn(tokens, n, generator=gen) * 0.1).to(DEVICE, dtype)

    h = lk.shrink(x, a, slots, ranks=ranks, path=path)
    assert h.shape == (tokens, r_max) and h.dtype == torch.float32
    h_ref = ref_shrink(x, a, slots, valid)
    assert torch.isfinite(h).all()
    assert torch.equal(h[slots < 0], torch.zeros_like(h[slots < 0]))
    if (slots >= 0).any():
        assert rel_err(h, h_ref) < TOLERANCE[dtype]

    y_in = y.clone()
    lk.expand(y, h, b, slots, scalings, ranks=ranks, path=path)
    y_ref = ref_expand(y_in, h_ref, b, slots, scalings, valid)
    assert torch.equal(y[slots < 0], y_in[slots < 0])  # tokens without an adapter are left alone
    if (slots >= 0).any():
        assert update_err(y, y_in, y_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(("per_sm", "tiles_per_program"), [(1, 1), (64, 1), (1, 3), (64, 3)])
def test_segment_kernels_with_fewer_programs_than_blocks_take_every_block_once(monkeypatch, per_sm, tiles_per_program):
    """The segment kernels' programs each take every P-th of the plan's blocks (and an expand program, of each, every
    Q-th output tile): with one program per multiprocessor, a few programs take the plan's blocks; with 64, one each;
    with 3 of the 16 output tiles a program, the last program over the tiles has one. Slots of rank 0 (a module the
    adapter does not target) are skipped and their tokens left alone."""
    monkeypatch.setattr(lk, "SHRINK_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(lk, "EXPAND_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(lk, "EXPAND_TILES_PER_PROGRAM", tiles_per_program)
    gen = torch.Generator().manual_seed(per_sm)
    tokens, k, n, num_slots, r_max, dtype = 300, 128, 2048, 64, 32, torch.bfloat16
    slots = random_slots(tokens, num_slots, "mixed", gen)
    ranks = random_ranks(num_slots, r_max, 1, gen)
    ranks[::5] = 0
    valid = rank_mask(ranks, num_slots, r_max, 1)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    a = padded(torch.randn(num_slots, r_max, k, generator=gen).to(DEVICE, dtype) / k**0.5, valid, 1)
    b = padded(torch.randn(num_slots, n, r_max, generator=gen).to(DEVICE, dtype), valid, 2)
    scalings = torch.rand(num_slots, generator=gen).to(DEVICE) + 0.5
    y = (torch.randn(tokens, n, generator=gen) * 0.1).to(DEVICE, dtype)
    y_in = y.clone()
    segments = lk.plan_segments(slots, num_slots)
    h = lk.shrink(x, a, slots, ranks=ranks, segments=segments)
    lk.expand(y, h, b, slots, scalings, ranks=ranks, segments=segments)
    untouched = (slots < 0) | (ranks[slots.long().clamp(min=0)] == 0)
    assert torch.equal(y[untouched], y_in[untouched])
    assert update_err(y, y_in, ref_expand(y_in, ref_shrink(x, a, slots, valid), b, slots, scalings, valid)) < 1e-2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes(path, dtype):
    gen = torch.Generator().manual_seed(7)
    tokens, k, n, num_slots, r_max = 90, 192, 160, 6, 16
    slots = random_slots(tokens, num_slots, "mixed", gen)
    valid = rank_mask(None, num_slots, r_max, 1)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    a = torch.randn(num_slots, r_max, k, generator=gen).to(DEVICE, dtype) / k**0.5
    b = torch.randn(num_slots, n, r_max, generator=gen).to(DEVICE, dtype)
    scalings = torch.full((num_slots,), 2.0, device=DEVICE)
    y = torch.randn(tokens, n, generator=gen).to(DEVICE, dtype)
    y_in = y.clone()
    h = lk.shrink(x, a, slots, path=path)
    lk.expand(y, h, b, slots, scalings, path=path)
    h_ref = ref_shrink(x, a, slots, valid)
    assert rel_err(h, h_ref) < TOLERANCE[dtype]
    assert rel_err(y, ref_expand(y_in, h_ref, b, slots, scalings, valid)) < TOLERANCE[dtype]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("groups", [2, 3])
def test_fused_groups_match_separate_modules(path, groups):
    """q/k/v (or gate/up): one shrink over concatenated A, one expand into each module's own output and B."""
    gen = torch.Generator().manual_seed(groups)
    tokens, k, num_slots, r_max = 77, 256, 6, 32
    outs = [256, 64, 64][:groups]
    dtype = torch.bfloat16
    slots = random_slots(tokens, num_slots, "mixed", gen)
    ranks = random_ranks(num_slots, r_max, groups, gen)  # (S, G), one slot not targeting group 1
    scalings = (torch.rand(num_slots, groups, generator=gen) + 0.5).to(DEVICE)
    valid = rank_mask(ranks, num_slots, r_max, groups)  # (S, G·r_max)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    a = padded(torch.randn(num_slots, groups * r_max, k, generator=gen).to(DEVICE, dtype) / k**0.5, valid, 1)
    group_valid = [valid[:, g * r_max : (g + 1) * r_max] for g in range(groups)]
    bs = [
        padded(torch.randn(num_slots, n, r_max, generator=gen).to(DEVICE, dtype), group_valid[g], 2)
        for g, n in enumerate(outs)
    ]
    # The outputs are views into one wide projection output, as a fused qkv linear would give.
    wide = (torch.randn(tokens, sum(outs), generator=gen) * 0.1).to(DEVICE, dtype)
    wide_in = wide.clone()
    ys = list(torch.split(wide, outs, dim=1))

    h = lk.shrink(x, a, slots, ranks=ranks, groups=groups, path=path)
    lk.expand_fused(ys, h, bs, slots, scalings, ranks=ranks, path=path)

    h_ref = ref_shrink(x, a, slots, valid)
    assert rel_err(h, h_ref) < 1e-2
    for g, (y_in, b) in enumerate(zip(torch.split(wide_in, outs, dim=1), bs, strict=True)):
        cols = slice(g * r_max, (g + 1) * r_max)
        want = ref_expand(y_in, h_ref[:, cols], b, slots, scalings[:, g], valid[:, cols])
        assert rel_err(ys[g], want) < 1e-2
    untargeted = slots == num_slots - 1  # that slot has rank 0 in group 1: its tokens' k output is untouched
    assert torch.equal(ys[1][untargeted], torch.split(wide_in, outs, dim=1)[1][untargeted])


def test_split_reduction_over_long_inputs():
    """One token over a 14336-wide input: the reduction is split across programs and met by atomic adds."""
    gen = torch.Generator().manual_seed(3)
    k, num_slots, r_max = 14336, 2, 16
    x = torch.randn(1, k, generator=gen).to(DEVICE, torch.bfloat16)
    a = torch.randn(num_slots, r_max, k, generator=gen).to(DEVICE, torch.bfloat16) / k**0.5
    slots = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    for path in ("gather", "segment"):
        h = lk.shrink(x, a, slots, path=path)
        assert rel_err(h, ref_shrink(x, a, slots, rank_mask(None, num_slots, r_max, 1))) < 1e-2


@pytest.mark.parametrize(("tokens", "num_slots"), [(100, 3), (256, 512), (300, 40), (2048, 7)])
def test_segment_plan_cuts_each_slots_tokens_into_blocks(tokens, num_slots):
    gen = torch.Generator().manual_seed(tokens + num_slots)
    slots = random_slots(tokens, num_slots, "mixed", gen)
    plan = lk.plan_segments(slots, num_slots)
    order, blocks, count = plan.order.cpu(), plan.blocks.cpu().long(), plan.count.item()
    assert (blocks[:count, 0] < num_slots).all() and (blocks[count:, 0] == num_slots).all()  # the count: blocks first
    covered = []
    for slot, row0, rows in blocks.tolist():
        if slot == num_slots:  # a program with no block
            continue
        taken = min(rows, plan.block_m)
        assert taken > 0 and row0 + taken <= tokens
        block = order[row0 : row0 + taken]
        assert (slots.cpu()[block] == slot).all()
        covered += block.tolist()
    assert sorted(covered) == (slots.cpu() >= 0).nonzero().flatten().tolist()  # every token once, none without a slot
    assert blocks[:, 0].tolist() == sorted(blocks[:, 0].tolist())  # numbered slot after slot


def test_segments_planned_once_serve_every_call():
    gen = torch.Generator().manual_seed(11)
    tokens, k, n, num_slots, r_max = 500, 128, 96, 12, 16
    slots = random_slots(tokens, num_slots, "mixed", gen)
    segments = lk.plan_segments(slots, num_slots)
    order, starts = segments.order.cpu(), segments.starts.cpu()
    for s in range(num_slots):
        members = order[starts[s] : starts[s + 1]]
        assert torch.equal(members.sort().values, (slots.cpu() == s).nonzero().flatten())
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, torch.bfloat16)
    a = torch.randn(num_slots, r_max, k, generator=gen).to(DEVICE, torch.bfloat16) / k**0.5
    b = torch.randn(num_slots, n, r_max, generator=gen).to(DEVICE, torch.bfloat16)
    scalings = torch.ones(num_slots, device=DEVICE)
    y = torch.zeros(tokens, n, device=DEVICE, dtype=torch.bfloat16)
    h = lk.shrink(x, a, slots, segments=segments)
    lk.expand(y, h, b, slots, scalings, segments=segments)
    valid = rank_mask(None, num_slots, r_max, 1)
    want = ref_expand(y.new_zeros(y.shape), ref_shrink(x, a, slots, valid), b, slots, scalings, valid)
    assert rel_err(y, want) < 1e-2


@pytest.mark.parametrize("tokens", [8, 512])  # one batch on each path
def test_step_replays_as_cuda_graph(tokens):
    """Captured once, replayed with other slots and activations written into the same buffers: still right."""
    gen = torch.Generator().manual_seed(tokens)
    k, n, num_slots, r_max = 256, 192, 8, 16
    dtype = torch.bfloat16
    a = torch.randn(num_slots, r_max, k, generator=gen).to(DEVICE, dtype) / k**0.5
    b = torch.randn(num_slots, n, r_max, generator=gen).to(DEVICE, dtype)
    ranks = random_ranks(num_slots, r_max, 1, gen)
    valid = rank_mask(ranks, num_slots, r_max, 1)
    scalings = torch.rand(num_slots, generator=gen).to(DEVICE) + 0.5
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    slots = random_slots(tokens, num_slots, "mixed", gen)
    y = torch.zeros(tokens, n, device=DEVICE, dtype=dtype)

    def step() -> None:
        y.zero_()
        h = lk.shrink(x, a, slots, ranks=ranks)
        lk.expand(y, h, b, slots, scalings, ranks=ranks)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        x.copy_(torch.randn(tokens, k, generator=gen).to(DEVICE, dtype))
        slots.copy_(random_slots(tokens, num_slots, "mixed", gen))
        graph.replay()
        want = ref_expand(torch.zeros_like(y), ref_shrink(x, a, slots, valid), b, slots, scalings, valid)
        assert rel_err(y, want) < 1e-2


def test_bad_shapes_are_refused():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    slots = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="shrink needs"):
        lk.shrink(x, a[:, :, :32], slots)
    with pytest.raises(ValueError, match="token_slots"):
        lk.shrink(x, a, slots[:3])
    with pytest.raises(ValueError, match="token_slots"):
        lk.shrink(x, a, slots.float())
    with pytest.raises(ValueError, match="ranks"):
        lk.shrink(x, a, slots, ranks=torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="path"):
        lk.shrink(x, a, slots, path="fast")
    h = lk.shrink(x, a, slots)
    y = torch.zeros(4, 32, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(2, 32, 16, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expand needs"):
        lk.expand(y, h, b[:, :16], slots, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="scalings"):
        lk.expand(y, h, b, slots, torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        lk.expand(y.t().contiguous().t(), h, b, slots, torch.ones(2, device=DEVICE))


@pytest.mark.parametrize("tokens", [24, 300])  # the gather path, the segment path
def test_paged_slot_memory_reads_only_each_adapters_own_rows(tokens):
    """Adapters of ranks 5 to 64 side by side in the paged slot memory of `LoraGroup` (q/k/v) and one `LoraLinear`;
    the rest of the memory is NaN, so a kernel reading past any adapter's rank (into a neighbour) would show."""
    from loramux.server.layers.lora import LoraGroup, LoraLinear, expand_torch, shrink_torch
    from loramux.server.layers.nf4_linear import NF4Linear
    from loramux.server.layers.slots import SlotLayout

    gen = torch.Generator().manual_seed(tokens)
    d_in, outs = 256, (256, 64, 64)
    layers = [LoraLinear(torch.randn(n, d_in, generator=gen).to(DEVICE), None, torch.bfloat16) for n in outs]
    group = LoraGroup(layers)
    group.allocate_slots(SlotLayout.of(num_slots=2, max_rank=64))  # 16 pages of rank 8
    for view in (group.lora_a, *(layer.lora_b for layer in layers)):
        view.as_strided((view.untyped_storage().nbytes() // view.element_size(),), (1,), 0).fill_(float("nan"))
    placements = {0: 8, 1: 5, 2: 16, 4: 32, 8: 64}  # first page -> rank (each run aligned to its size)
    for page, rank in placements.items():
        for g, layer in enumerate(layers):
            if (page, g) == (1, 2):
                layer.write_slot(page, None, None, 0.0)  # this adapter does not target v
                continue
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            b = torch.randn(layer.out_features, rank, generator=gen)
            layer.write_slot(page, a.to(DEVICE, torch.bfloat16), b.to(DEVICE, torch.bfloat16), 0.5 + page / 8)
    choices = torch.tensor([-1, *placements])
    slots = choices[torch.randint(0, len(choices), (tokens,), generator=gen)].to(DEVICE)
    x = torch.randn(tokens, d_in, generator=gen).to(DEVICE, torch.bfloat16)

    ys = group(x, slots)
    for layer, y in zip(layers, ys, strict=True):
        want = NF4Linear.forward(layer, x).float()
        h = shrink_torch(x.float(), layer.lora_a.float(), slots, layer.ranks)
        expand_torch(want, h, layer.lora_b.float(), slots, layer.scalings, layer.ranks)
        assert not torch.isnan(y).any() and rel_err(y, want) < TOLERANCE[torch.bfloat16]
    single = layers[1]  # the same memory through the one-module path
    y = NF4Linear.forward(single, x)
    single.lora_delta(x, y, slots)
    assert rel_err(y, ys[1]) < TOLERANCE[torch.bfloat16]
