"""The adapter CPU cache carved from a host arena: where adapters are read to, what eviction frees, and what a new
revision replaces."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loramux.core.adapter_source import AdapterRef
from loramux.core.model_config import ModelConfig
from loramux.server.engine.adapter_cache import AdapterCache
from loramux.server.engine.adapter_reader import ReadSpec
from loramux.server.engine.host_arena import HostArena

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
ADAPTER_BYTES = 2 * 4 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4)  # rank 4 on q_proj and v_proj of 2 layers, fp32
SPEC = ReadSpec(CONFIG, torch.float32, b_rank_major=True)


def write_adapter(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module, out in (("q_proj", 16), ("v_proj", 8)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 16, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture
def cache(dir_source, tmp_path):
    """A cache whose arena holds two adapters, over a source of three."""
    for name in "abc":
        dir_source.publish(f"t/{name}", write_adapter(tmp_path / name, seed=ord(name)))
    arena = HostArena(2 * ADAPTER_BYTES, pin_memory=False)
    cache = AdapterCache(dir_source, SPEC, 8, 10 * ADAPTER_BYTES, arena=arena)
    yield cache
    cache.shutdown()


def fetch(cache: AdapterCache, name: str):
    return cache.fetch(AdapterRef(f"t/{name}"), None)[1]


def in_arena(cache: AdapterCache, weights) -> bool:
    start = cache.arena.buffer.data_ptr()
    return start <= weights.buffer.data_ptr() < start + cache.arena.capacity


def values(weights) -> list[torch.Tensor]:
    return [t.clone() for m in weights.modules.values() for t in (m.a, m.b)]


def test_adapters_are_read_into_the_arena_and_the_least_recent_leaves_to_make_room(cache, dir_source):
    a = fetch(cache, "a")
    assert in_arena(cache, a) and a.nbytes() == ADAPTER_BYTES
    assert fetch(cache, "b") is not a and fetch(cache, "a") is a  # a is now the most recently used
    del a
    c = fetch(cache, "c")  # the arena is full: b, least recently used and held by nothing, leaves
    assert in_arena(cache, c)
    stats = cache.stats()
    assert stats["adapter_cache_entries"] == 2 and stats["adapter_loads_outside_arena"] == 0
    assert stats["adapter_loads"] == 3 and stats["adapter_cache_hits"] == 1
    assert fetch(cache, "a") is not None and cache.stats()["adapter_cache_hits"] == 2  # a stayed


def test_an_evicted_adapter_that_is_still_held_keeps_its_bytes(cache):
    a, b = fetch(cache, "a"), fetch(cache, "b")  # held, as by requests waiting for a slot
    a_values, b_values = values(a), values(b)
    c = fetch(cache, "c")  # a and b leave the cache, but their regions stay theirs
    assert not in_arena(cache, c) and cache.stats()["adapter_loads_outside_arena"] == 1
    for got, want in zip(values(a) + values(b), a_values + b_values, strict=True):
        assert torch.equal(got, want)
    c_values = values(c)
    del b  # b's region returns to the arena: the next adapter read goes there
    again = fetch(cache, "b")
    assert in_arena(cache, again)
    for got, want in zip(values(again), b_values, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(values(a) + values(c), a_values + c_values, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("readers", [0, 2], ids=["fetch-threads", "reader-processes"])
def test_concurrent_fetches_through_a_small_arena_never_mix_up_adapters(dir_source, tmp_path, readers):
    names = [f"n{i}" for i in range(12)]
    expected = {}
    for i, name in enumerate(names):
        dir_source.publish(f"t/{name}", write_adapter(tmp_path / name, seed=i))
    arena = HostArena(3 * ADAPTER_BYTES, pin_memory=False, shared=readers > 0)  # room for 3 of the 12
    cache = AdapterCache(dir_source, SPEC, 8, 10 * ADAPTER_BYTES, arena=arena, reader_processes=readers)
    assert (cache.readers is not None) == (readers > 0)
    try:
        for name in names:
            expected[name] = values(fetch(cache, name))
        held = []  # (name, weights): as requests waiting for a slot would hold them, some for a while
        for round_ in range(4):
            futures = [(name, cache.fetch_async(AdapterRef(f"t/{name}"), None)) for name in names[round_:] + names]
            for name, future in futures:
                weights = future.result(timeout=30)[1]
                held.append((name, weights))
                if len(held) > 5:
                    old_name, old = held.pop(0)
                    assert all(torch.equal(a, b) for a, b in zip(values(old), expected[old_name], strict=True))
        for name, weights in held:
            assert all(torch.equal(a, b) for a, b in zip(values(weights), expected[name], strict=True))
        assert cache.stats()["adapter_loads"] > 2 * len(names)  # adapters left the cache for room and were read again
    finally:
        cache.shutdown()


def test_fetch_threads_use_the_cpu_threads_they_are_given_and_leave_the_callers_alone(dir_source, tmp_path):
    dir_source.publish("t/a", write_adapter(tmp_path / "a", seed=1))
    before = torch.get_num_threads()
    spec = ReadSpec(CONFIG, torch.float32, cpu_threads=1)
    cache = AdapterCache(dir_source, spec, 8, 10 * ADAPTER_BYTES)
    try:
        key, weights = cache.fetch_async(AdapterRef("t/a"), None).result()
        assert key.startswith("t/a@") and weights.max_rank == 4
        assert cache._fetcher.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == before  # this thread's count is its own
    finally:
        cache.shutdown()
        restore = threading.Thread(target=torch.set_num_threads, args=(before,))  # the default for later threads
        restore.start()
        restore.join()


def test_without_reader_processes_the_fetch_threads_read(dir_source, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    dir_source.publish("t/a", write_adapter(tmp_path / "a", seed=1))
    arena = HostArena(4 * ADAPTER_BYTES, pin_memory=False, shared=True)
    cache = AdapterCache(dir_source, SPEC, 8, 10 * ADAPTER_BYTES, arena=arena, reader_processes=2)
    try:
        assert cache.readers is None and cache.stats()["adapter_reader_processes"] == 0
        assert in_arena(cache, fetch(cache, "a"))
    finally:
        cache.shutdown()


def test_a_new_revision_replaces_the_old_one_in_the_cache_and_is_passed_on_in_order(cache, dir_source, tmp_path):
    seen: list[tuple[str, str]] = []
    cache.on_new_revision = lambda repo, commit: seen.append((repo, commit))
    old = cache.fetch(AdapterRef("t/a"), None)[0]
    assert seen == []  # the first revision seen replaces nothing
    new_commit = dir_source.publish("t/a", write_adapter(tmp_path / "a2", seed=99))
    new = cache.fetch(AdapterRef("t/a"), None)[0]
    assert new == f"t/a@{new_commit}" and seen == [("t/a", new_commit)]
    assert cache.stats()["adapter_cache_entries"] == 1  # the old revision left the cache
    pinned = cache.fetch(AdapterRef.parse(old), None)[0]  # asked for by its commit: the old one is the latest again
    assert pinned == old and seen == [("t/a", new_commit), ("t/a", old.split("@")[1])]
