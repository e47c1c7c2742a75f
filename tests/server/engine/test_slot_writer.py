"""Writing adapters into slots: the packed path (what the engine uses) against the per-module one, and the fence a
write waits for."""

from __future__ import annotations

import pytest
import torch

from loramux.core.adapter_config import AdapterConfig
from loramux.server.engine.slot_writer import SlotWriter
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.loader import load_base
from loramux.server.models.lora_weights import LoraModule, LoraWeights


def random_adapter(names: list[str], shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name in names:
        out_features, in_features = shapes[name]
        a, b = torch.randn(rank, in_features, generator=gen), torch.randn(out_features, rank, generator=gen)
        modules[name] = LoraModule(a, b, scaling=0.5 + seed)
    return LoraWeights(AdapterConfig(r=rank, lora_alpha=rank, target_modules=["q_proj"]), modules)


def writer_for(tiny_checkpoint, device: str, page_rank: int | None = None, **shape) -> SlotWriter:
    base = load_base(str(tiny_checkpoint(**shape)), device=device)
    base.model.allocate_lora_slots(SlotLayout.of(num_slots=2, max_rank=8, page_rank=page_rank))
    return SlotWriter(base.model)


def write_now(writer: SlotWriter, slot: int, weights: LoraWeights | None, after=None) -> None:
    """Write and wait for the copies."""
    done = writer.write(slot, weights, after)
    if done is not None:
        done.synchronize()


def slot_state(writer: SlotWriter, slot: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """What a slot serves in every module: A and B up to its rank (the rows past it are never read), scaling, rank."""
    state = {}
    for name, m in writer.lora_modules.items():
        rank = int(m.ranks[slot])
        a, b = m.lora_a[slot, :rank].clone(), m.lora_b[slot, :, :rank].clone()
        state[name] = (a, b, m.scalings[slot].clone(), m.ranks[slot].clone())
    return state


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # on a GPU: pinned buffer, staged copy


@pytest.mark.parametrize("device", DEVICES)
def test_packed_writes_fill_a_used_slot_exactly_as_per_module_writes(tiny_checkpoint, device):
    writer = writer_for(tiny_checkpoint, device)
    shapes = {name: (m.out_features, m.in_features) for name, m in writer.lora_modules.items()}
    names = list(shapes)
    # a rank-8 adapter on every module, then a rank-3 one on every other module (in reverse order) in the same slot
    first = random_adapter(names, shapes, rank=8, seed=1)
    second = random_adapter(names[::-2], shapes, rank=3, seed=2)

    expected = []
    for weights in (first, second):
        write_now(writer, 1, weights)  # fp32 tensors without a buffer: one module at a time
        expected.append(slot_state(writer, 1))
    write_now(writer, 1, None)
    assert all(int(m.ranks[1]) == 0 and float(m.scalings[1]) == 0 for m in writer.lora_modules.values())

    for weights, want in zip((first, second), expected, strict=True):
        rank_major = weights.packed(writer.dtype, pin_memory=device == "cuda", b_rank_major=True)  # as slots hold B
        row_major = weights.packed(writer.dtype)  # a buffer of B as PEFT stores it: written all the same
        for buffered in (rank_major, row_major):
            write_now(writer, 1, None)
            write_now(writer, 1, buffered)
            got = slot_state(writer, 1)
            for name in names:
                for g, w in zip(got[name], want[name], strict=True):
                    torch.testing.assert_close(g, w)
    m = writer.lora_modules[next(n for n in names if n not in second.modules)]  # not in the second one: cleared
    assert m.ranks[1] == 0 and m.scalings[1] == 0
    assert writer.lora_modules[names[-1]].ranks[1] == 3 and names[-1] in second.modules
    assert all(int(m.ranks[0]) == 0 for m in writer.lora_modules.values())  # the other slot is untouched


@pytest.mark.parametrize("device", DEVICES)
def test_packed_writes_stay_exact_when_slots_and_layouts_repeat(tiny_checkpoint, device):
    """Writes keep their copy plans per adapter layout and one staging buffer: a layout met again, a slot
    taken by another layout and back, a buffer with B row-major after one with B rank-major, and a larger adapter
    after smaller ones (the staging buffer grows) all leave each slot serving exactly what per-module writes give."""
    writer = writer_for(tiny_checkpoint, device)
    shapes = {name: (m.out_features, m.in_features) for name, m in writer.lora_modules.items()}
    names = list(shapes)
    adapters = [
        random_adapter(names[::3], shapes, rank=2, seed=1),  # small first: the staging buffer grows later
        random_adapter(names[1::2], shapes, rank=4, seed=2),
        random_adapter(names[::3], shapes, rank=2, seed=3),  # the first one's layout, other values
        random_adapter(names, shapes, rank=8, seed=4),
    ]
    expected = []
    for weights in adapters:
        write_now(writer, 0, weights)  # per module, no buffer
        expected.append(slot_state(writer, 0))
    writes = [(1, 0), (1, 1), (0, 2), (1, 2), (1, 3), (0, 0), (1, 1), (0, 3), (1, 0), (0, 1), (0, 3), (1, 2)]
    for i, (slot, index) in enumerate(writes):
        # B as the slots hold it (rank-major) or as files hold it (row-major: turned on the way), in turn
        weights = adapters[index].packed(writer.dtype, b_rank_major=i % 3 != 0)
        write_now(writer, slot, weights)
        got = slot_state(writer, slot)
        for name in names:
            for g, w in zip(got[name], expected[index][name], strict=True):
                torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_writes_of_adapters_in_file_order_with_mixed_ranks_into_paged_slots(tiny_checkpoint, device):
    """The copies a packed write makes run over every layer of a projection at once. With 12 layers, modules in the
    order adapter files sort them (layers 0, 1, 10, 11, 2, ...), ranks that differ by layer and module (breaking
    the runs), and slots that start at pages inside the memory, each slot serves exactly what per-module writes
    give, and its neighbours keep theirs."""
    writer = writer_for(tiny_checkpoint, device, page_rank=2, num_hidden_layers=12)  # 8 pages of rank 2
    shapes = {name: (m.out_features, m.in_features) for name, m in writer.lora_modules.items()}
    names = sorted(n for n in shapes if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "gate_proj", "down_proj"))
    gen = torch.Generator().manual_seed(0)
    modules = {}
    for name in names:
        layer = int(name.split(".")[2])
        rank = 4 if layer not in (3, 7) or name.endswith("q_proj") else 2  # v, gate, down of layers 3 and 7: rank 2
        out_features, in_features = shapes[name]
        a, b = torch.randn(rank, in_features, generator=gen), torch.randn(out_features, rank, generator=gen)
        modules[name] = LoraModule(a, b, scaling=0.25 * (1 + layer))
    weights = LoraWeights(AdapterConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), modules)
    other = random_adapter(list(shapes), shapes, rank=2, seed=5)  # on pages 2 and 6, beside the adapter's pages

    expected = {}
    for slot, adapter in ((2, other), (4, weights), (6, other)):
        write_now(writer, slot, adapter)  # per module
        expected[slot] = slot_state(writer, slot)
    for rank_major in (False, True):
        for slot in (2, 4, 6):
            write_now(writer, slot, None)
        for slot, adapter in ((4, weights), (2, other), (6, other)):  # the neighbours after: they must not spill
            write_now(writer, slot, adapter.packed(writer.dtype, b_rank_major=rank_major))
        for slot in (2, 4, 6):
            got = slot_state(writer, slot)
            for name in shapes:
                for g, w in zip(got[name], expected[slot][name], strict=True):
                    torch.testing.assert_close(g, w)
    assert int(writer.lora_modules["model.layers.3.mlp.down_proj"].ranks[4]) == 2
    assert int(writer.lora_modules["model.layers.10.self_attn.k_proj"].ranks[4]) == 0  # not in the adapter


@pytest.mark.gpu  # streams and events
def test_a_write_waits_for_the_work_before_its_fence_and_not_for_what_came_after(tiny_checkpoint):
    """A slot write waits for the step work queued before the slot was claimed (`fence`), which may still read
    the slot's previous adapter, and not for steps queued after it (they do not use the slot)."""
    writer = writer_for(tiny_checkpoint, "cuda")
    shapes = {name: (m.out_features, m.in_features) for name, m in writer.lora_modules.items()}
    weights = random_adapter(list(shapes), shapes, rank=4, seed=1).packed(writer.dtype, pin_memory=True)
    write_now(writer, 0, weights)
    want = slot_state(writer, 0)
    write_now(writer, 0, None)
    torch.cuda.synchronize()

    fence = writer.fence()
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued after the fence: a step in flight
    after = torch.cuda.Event()
    after.record()
    write_now(writer, 0, weights, after=fence)
    assert not after.query()  # the write returned, its copies done, while the later work still runs
    torch.cuda.synchronize()
    got = slot_state(writer, 0)
    for name in shapes:
        for g, w in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(g, w)

    before = torch.cuda.Event()
    torch.cuda._sleep(200_000_000)  # queued before the fence now
    before.record()
    write_now(writer, 1, weights, after=writer.fence())
    assert before.query()  # the write waited for it
    torch.cuda._sleep(200_000_000)
    last = torch.cuda.Event()
    last.record()
    write_now(writer, 1, weights)  # no fence: it waits for everything queued on the step stream
    assert last.query()
