"""Adapter reads in reader processes, into the shared arena: the same weights and errors as a read in this process,
and a reader that dies is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loramux.core.adapter_config import AdapterConfigError
from loramux.core.model_config import ModelConfig
from loramux.server.engine.adapter_reader import AdapterReaderError, ReaderPool, ReadSpec
from loramux.server.engine.host_arena import HostArena
from loramux.server.models.lora_weights import AdapterMismatchError, load_lora

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip


def write_adapter(directory: Path, seed: int, rank: int = 4, poison: bool = False, out: int = 16) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module, width in (("q_proj", out), ("v_proj", 8)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 16, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=gen)
    if poison:
        tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture
def pool():
    arena = HostArena(1 << 16, pin_memory=False, shared=True)
    readers = ReaderPool(1, arena, ReadSpec(CONFIG, torch.bfloat16))
    yield readers, arena
    readers.close()
    arena.close()


def allocator(arena: HostArena, taken: list[int]):
    def allocate(nbytes: int):
        found = arena.allocate(nbytes)
        if found is None:
            return None, torch.empty(nbytes, dtype=torch.uint8)
        taken.append(found[0])
        return found

    return allocate


def assert_same(got, want) -> None:
    assert list(got.modules) == list(want.modules)
    for name, module in want.modules.items():
        assert torch.equal(got.modules[name].a, module.a) and torch.equal(got.modules[name].b, module.b)
        assert got.modules[name].scaling == module.scaling
    assert got.config == want.config


def test_a_reader_process_fills_the_shared_arena_with_what_load_lora_reads(pool, tmp_path):
    readers, arena = pool
    taken: list[int] = []
    for seed, rank in enumerate((4, 8, 2)):
        path = write_adapter(tmp_path / f"a{seed}", seed, rank=rank)
        weights = readers.read(path, allocator(arena, taken))
        assert_same(weights, load_lora(path, CONFIG, torch.bfloat16))
        start = arena.buffer.data_ptr() + taken[-1]
        assert weights.buffer.data_ptr() == start  # the views are of the region the reader wrote
    assert len(taken) == 3 and readers.restarts == 0


def test_bad_adapters_raise_what_a_read_here_raises_and_the_reader_goes_on(pool, tmp_path):
    readers, arena = pool
    poisoned = write_adapter(tmp_path / "nan", 1, poison=True)
    wrong_base = write_adapter(tmp_path / "wide", 2, out=12)  # q_proj's B is 12 wide: the base's q_proj has 16
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    taken: list[int] = []
    for path, kind in ((poisoned, AdapterMismatchError), (wrong_base, AdapterMismatchError),
                       (missing, AdapterConfigError)):  # fmt: skip
        with pytest.raises(kind) as here:
            load_lora(path, CONFIG, torch.bfloat16)
        with pytest.raises(kind) as there:
            readers.read(path, allocator(arena, taken))
        assert str(there.value) == str(here.value)
    good = write_adapter(tmp_path / "good", 3)
    assert_same(readers.read(good, allocator(arena, taken)), load_lora(good, CONFIG, torch.bfloat16))
    assert readers.restarts == 0


def test_an_adapter_larger_than_the_arena_is_read_here(tmp_path):
    arena = HostArena(1024, pin_memory=False, shared=True)  # smaller than any adapter below
    readers = ReaderPool(1, arena, ReadSpec(CONFIG, torch.float32))
    try:
        path = write_adapter(tmp_path / "big", 5)
        weights = readers.read(path, allocator(arena, []))
        assert_same(weights, load_lora(path, CONFIG, torch.float32))
        small = write_adapter(tmp_path / "next", 6, rank=1)  # the reader serves the next read
        found: list[int] = []
        assert_same(readers.read(small, allocator(arena, found)), load_lora(small, CONFIG, torch.float32))
        assert found == [0]
    finally:
        readers.close()
        arena.close()


def test_a_reader_that_died_is_replaced_and_the_read_still_succeeds(pool, tmp_path):
    readers, arena = pool
    path = write_adapter(tmp_path / "a", 7)
    (first,) = readers._readers
    first.process.kill()
    first.process.wait()
    weights = readers.read(path, allocator(arena, []))  # the dead reader fails the first try; a new one reads it
    assert_same(weights, load_lora(path, CONFIG, torch.bfloat16))
    assert readers.restarts == 1 and readers._readers[0] is not first


def test_wait_ready_returns_once_every_reader_started_and_names_one_that_could_not(monkeypatch, pool):
    readers, _ = pool
    readers.wait_ready()
    assert all(r.ready for r in readers._readers)
    arena = HostArena(1 << 12, pin_memory=False, shared=True)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a reader that exits at once
    broken = ReaderPool(1, arena, ReadSpec(CONFIG, torch.float32))
    with pytest.raises(AdapterReaderError, match="exited as it started"):
        broken.wait_ready()
    broken.close()
    arena.close()


def test_when_no_reader_can_be_started_again_reads_fail_at_once(monkeypatch, pool, tmp_path):
    readers, arena = pool
    path = write_adapter(tmp_path / "a", 7)

    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    (only,) = readers._readers
    only.process.kill()
    only.process.wait()
    with pytest.raises(AdapterReaderError):
        readers.read(path, allocator(arena, []))  # the dead reader cannot be replaced
    assert readers.processes == 0
    with pytest.raises(AdapterReaderError, match="no adapter reader process is running"):
        readers.read(path, allocator(arena, []))  # at once, rather than waiting for a reader


def test_close_stops_the_readers_and_refuses_reads(tmp_path):
    arena = HostArena(1 << 16, pin_memory=False, shared=True)
    readers = ReaderPool(2, arena, ReadSpec(CONFIG, torch.float32))
    processes = [r.process for r in readers._readers]
    readers.close()
    assert all(p.poll() is not None for p in processes)
    with pytest.raises(AdapterReaderError, match="shut down"):
        readers.read(write_adapter(tmp_path / "a", 1), allocator(arena, []))
    arena.close()


def test_a_reader_pool_needs_a_shared_arena():
    with pytest.raises(ValueError, match="shared arena"):
        ReaderPool(1, HostArena(1 << 12, pin_memory=False), ReadSpec(CONFIG, torch.float32))


def test_a_shared_arena_is_one_memory_file_another_mapping_sees():
    arena = HostArena(4096, pin_memory=False, shared=True)
    offset, region = arena.allocate(100)
    region.fill_(9)
    with open(f"/proc/self/fd/{arena.fd}", "rb") as f:
        f.seek(offset)
        assert f.read(100) == bytes([9]) * 100
    fd = arena.fd
    arena.close()
    assert arena.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)
    assert int(region.sum()) == 900  # regions stay readable after the file is closed
