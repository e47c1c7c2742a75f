"""The adapter CPU cache carved from a host arena: where adapters are read to, and what eviction frees."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from loramux.adapters.source import AdapterRef
from loramux.server.engine.adapter_cache import AdapterCache
from loramux.server.engine.host_arena import HostArena
from loramux.server.models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
ADAPTER_BYTES = 2 * 4 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4)  # rank 4 on q_proj and v_proj of 2 layers, fp32


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
    cache = AdapterCache(dir_source, CONFIG, lambda *_: None, 2, 8, 10 * ADAPTER_BYTES, arena=arena)
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
    cache = AdapterCache(
        dir_source, CONFIG, lambda *_: None, 2, 8, 10 * ADAPTER_BYTES, arena=arena, reader_processes=readers
    )
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


def settle(cache: AdapterCache, *slots: int) -> None:
    """Wait until the slot writes of `slots` landed (the loader thread marks them ready)."""
    for _ in range(400):
        if all(cache.is_ready(i) for i in slots):
            return
        time.sleep(0.005)
    raise AssertionError("slot writes never finished")


def test_slot_memory_is_paged_by_rank_and_runs_are_taken_whole():
    written = []
    # one slot of rank 32: four pages of rank 8
    cache = AdapterCache(None, CONFIG, lambda i, w, _: written.append((i, w.max_rank)), 1, 32, cpu_cache_bytes=0)
    try:
        a, b, c = (cache.claim(key, SimpleNamespace(max_rank=r)) for key, r in (("a", 8), ("b", 16), ("c", 3)))
        assert (a, b, c) == (0, 2, 1)  # b needs an aligned pair of pages; c fits the page left beside a
        settle(cache, a, b, c)
        assert sorted(written) == [(0, 8), (1, 3), (2, 16)]
        for index in (a, b, c):
            cache.pin(index)
        assert cache.claim("d", SimpleNamespace(max_rank=8)) is None  # every page is held
        cache.unpin(c)
        assert cache.claim("d", SimpleNamespace(max_rank=16)) is None  # each pair still holds a pinned adapter
        assert cache.claim("d", SimpleNamespace(max_rank=8), exclude={c}) is None  # c's page is reserved
        d = cache.claim("d", SimpleNamespace(max_rank=8))
        assert d == c and cache.resident() == {"a": 0, "d": 1, "b": 2}
        settle(cache, d)
        cache.unpin(a)
        cache.unpin(b)
        cache.pin(d)
        assert cache.claim("e", SimpleNamespace(max_rank=16)) == 2  # pages 0-1 hold d, pinned: b's pair goes
        settle(cache, 2)
        cache.unpin(d)
        assert cache.claim("f", SimpleNamespace(max_rank=32), keep={"e"}) == 0  # the whole slot: a, d and e leave
        assert cache.resident() == {"f": 0}
        stats = cache.stats()
        assert (stats["slots_total"], stats["slot_pages_total"], stats["slot_pages_used"]) == (1, 4, 4)
    finally:
        cache.shutdown()


def test_a_slot_write_gets_the_fence_taken_by_the_thread_that_claimed_the_slot():
    """The write runs on the loader thread but must wait only for the work queued before the claim: the fence is
    taken on the claiming thread (the step loop), at the claim, and handed to the write."""
    fences, written = [], []

    def fence() -> tuple[str, int]:
        fences.append((threading.current_thread().name, len(fences)))
        return fences[-1]

    cache = AdapterCache(None, CONFIG, lambda i, w, after: written.append((i, after)), 1, 32, cpu_cache_bytes=0,
                         fence=fence)  # fmt: skip
    try:
        a = cache.claim("a", SimpleNamespace(max_rank=8))
        b = cache.claim("b", SimpleNamespace(max_rank=16))
        settle(cache, a, b)
        me = threading.current_thread().name
        assert fences == [(me, 0), (me, 1)]
        assert sorted(written) == [(a, (me, 0)), (b, (me, 1))]
    finally:
        cache.shutdown()


def test_a_run_whose_adapters_were_used_least_recently_is_emptied_first():
    cache = AdapterCache(None, CONFIG, lambda i, w, _: None, 1, 32, cpu_cache_bytes=0)
    try:
        slots = [cache.claim(key, SimpleNamespace(max_rank=8)) for key in "wxyz"]
        settle(cache, *slots)
        for index in (0, 1, 3, 2):  # pages 0-1 used first, then page 3, then page 2 last
            cache.pin(index)
            cache.unpin(index)
        assert cache.claim("pair", SimpleNamespace(max_rank=16)) == 0
        assert cache.resident() == {"pair": 0, "y": 2, "z": 3}
        settle(cache, 0)
        cache.pin(0)  # pair is now the most recent
        cache.unpin(0)
        assert cache.claim("one", SimpleNamespace(max_rank=8), keep={"z"}) == 2  # z is wanted: y goes, not z
        settle(cache, 2)
        cache.pin(2)
        cache.unpin(2)
        assert cache.claim("two", SimpleNamespace(max_rank=8)) == 3  # z was used before pair and one
    finally:
        cache.shutdown()


def test_fetch_threads_use_the_cpu_threads_they_are_given_and_leave_the_callers_alone(dir_source, tmp_path):
    dir_source.publish("t/a", write_adapter(tmp_path / "a", seed=1))
    before = torch.get_num_threads()
    cache = AdapterCache(dir_source, CONFIG, lambda *_: None, 2, 8, 10 * ADAPTER_BYTES, fetch_cpu_threads=1)
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
    cache = AdapterCache(dir_source, CONFIG, lambda *_: None, 2, 8, 10 * ADAPTER_BYTES, arena=arena, reader_processes=2)
    try:
        assert cache.readers is None and cache.stats()["adapter_reader_processes"] == 0
        assert in_arena(cache, fetch(cache, "a"))
    finally:
        cache.shutdown()


class FakeWrite:
    """What a queued slot write completes at: done once the test says so."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_writes_issued_by_the_claiming_thread_make_their_slot_ready_once_done():
    """With `issue_write` no loader thread writes: the claiming thread queues the writes of its claims when it calls
    `issue_writes`, and a slot is ready only once its write is seen done, holding the weights until then."""
    issued: list[tuple[str, int, object, object]] = []
    handles: dict[int, FakeWrite] = {}

    def issue(index: int, weights, after) -> FakeWrite:
        issued.append((threading.current_thread().name, index, weights, after))
        handles[index] = FakeWrite()
        return handles[index]

    fences = iter(range(100))
    cache = AdapterCache(None, CONFIG, lambda *_: pytest.fail("the loader thread wrote"), 1, 32, cpu_cache_bytes=0,
                         fence=lambda: next(fences), issue_write=issue)  # fmt: skip
    try:
        a_weights, b_weights = SimpleNamespace(max_rank=8), SimpleNamespace(max_rank=16)
        a, b = cache.claim("a", a_weights), cache.claim("b", b_weights)
        assert issued == [] and cache.writes_pending() == 2  # claimed: nothing written until issue_writes
        assert cache.issue_writes() == 2 and cache.issue_writes() == 0
        me = threading.current_thread().name
        assert issued == [(me, a, a_weights, 0), (me, b, b_weights, 1)]  # each with the fence of its claim
        assert not cache.is_ready(a) and not cache.is_ready(b)
        handles[b].done = True
        assert cache.complete_writes() == 1  # a still under way
        assert cache.is_ready(b) and not cache.is_ready(a)
        assert cache._writing[0][2] is a_weights  # its buffer is kept while the copies may read it
        assert cache.complete_writes(wait=True) == 0 and handles[a].waited and cache.is_ready(a)
        assert cache.writes_pending() == 0 and cache.stats()["adapter_slot_loads"] == 2
        assert cache._loader._work_queue.qsize() == 0
    finally:
        cache.shutdown()


def test_a_write_issued_with_no_handle_is_done_and_one_that_fails_frees_its_slot_when_taken():
    """A write that fails holds its slot (not ready, not claimable) until the step loop takes the failure, so that
    it can end the requests pinned to it; then the slot is free."""
    error = RuntimeError("out of memory")

    def issue(index: int, weights, after) -> None:
        if weights.max_rank == 16:
            raise error
        return None  # done already, as on the CPU

    cache = AdapterCache(None, CONFIG, lambda *_: None, 1, 32, cpu_cache_bytes=0, issue_write=issue)
    try:
        a = cache.claim("a", SimpleNamespace(max_rank=8))
        b = cache.claim("b", SimpleNamespace(max_rank=16))
        assert cache.issue_writes() == 2
        assert cache.is_ready(a) and not cache.is_ready(b) and cache.writes_pending() == 0
        cache.pin(a)  # a request runs on a
        assert cache.claim("c", SimpleNamespace(max_rank=16)) is None  # b's pages are held, a's in use
        assert cache.failed_writes() == [(b, "b", error)] and cache.failed_writes() == []
        assert cache.resident() == {"a": a}  # b's slot was freed: its pages can be claimed again
        assert cache.claim("c", SimpleNamespace(max_rank=16)) == b
    finally:
        cache.shutdown()


def test_a_write_that_fails_on_the_loader_thread_is_handed_over_the_same_way():
    def write(index: int, weights, after) -> None:
        raise RuntimeError("device lost")

    cache = AdapterCache(None, CONFIG, write, 1, 32, cpu_cache_bytes=0)
    try:
        b = cache.claim("b", SimpleNamespace(max_rank=16))
        for _ in range(400):
            failed = cache.failed_writes()
            if failed:
                break
            time.sleep(0.005)
        assert [(index, key, str(exc)) for index, key, exc in failed] == [(b, "b", "device lost")]
        assert cache.resident() == {} and cache.claim("c", SimpleNamespace(max_rank=16)) == b
    finally:
        cache.shutdown()
