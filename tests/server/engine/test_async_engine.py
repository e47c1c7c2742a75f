"""The asyncio API the HTTP layer uses: streams, first-item errors, abort, overload, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from loramux.adapters.source import AdapterNotFoundError
from loramux.server.engine.engine import AsyncEngine, EngineConfig
from loramux.server.engine.errors import EngineStoppedError, QueueFullError
from loramux.server.engine.request import SamplingParams
from loramux.server.models.loader import load_base


@pytest.fixture(params=[False, True], ids=["streamed-at-once", "streamed-next-step"])
def engine(request, tiny_checkpoint, tmp_path, peft_helpers):
    """An engine streaming each step's outputs at once, or during the next step (`overlap_outputs`, as on a GPU)."""
    import torch
    import transformers

    path = tiny_checkpoint()
    base = load_base(str(path), device="cpu")
    source = peft_helpers.DirSource(tmp_path / "source")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    peft_helpers.add_peft_adapter(model, "a", tmp_path, seed=0, b_std=0.2, r=4, target_modules=["q_proj", "v_proj"])
    source.publish("t/a", tmp_path / "a", tenant="acme")  # private to tenant acme
    config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, overlap_outputs=request.param)
    engine = AsyncEngine.start(base, source, config)
    yield engine
    engine.shutdown()


async def collect(stream):
    return [item async for item in stream]


def test_streams_deltas_and_counts(engine):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    async def main():
        streams = [
            engine.submit(prompt="hello", params=params, request_id="plain"),
            engine.submit(messages=[{"role": "user", "content": "hi"}], adapter="t/a", params=params, tenant="acme"),
        ]
        return await asyncio.gather(*(collect(s) for s in streams))

    for items in asyncio.run(main()):
        last = items[-1]
        assert last.finish_reason == "length"
        assert all(item.finish_reason is None for item in items[:-1])
        assert last.completion_tokens == 5 == sum(len(i.token_ids) for i in items)
        assert last.prompt_tokens > 0
        tokens = [t for i in items for t in i.token_ids]
        assert "".join(i.text for i in items) == engine.engine.base.tokenizer.decode(tokens, skip_special_tokens=True)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and stats["adapter_loads"] == 1


def test_unknown_adapter_is_the_first_item_and_serving_goes_on(engine):
    params = SamplingParams(max_tokens=2, temperature=0.0)

    async def main():
        with pytest.raises(AdapterNotFoundError):
            await collect(engine.submit(prompt="x", adapter="t/missing", params=params))
        with pytest.raises(AdapterNotFoundError):  # another tenant's private adapter reads as missing
            await collect(engine.submit(prompt="x", adapter="t/a", params=params, tenant="other"))
        return await collect(engine.submit(prompt="x", adapter="t/a", params=params, tenant="acme"))

    assert asyncio.run(main())[-1].finished


def test_abort_mid_stream_frees_everything(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        stream = engine.submit(prompt_ids=[5] * 30, adapter="t/a", params=params, tenant="acme")
        first = await stream.__anext__()
        assert engine.stats()["slots_used"] == 1
        stream.abort()
        rest = await collect(stream)
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished and rest[-1].finish_reason == "abort"
    assert rest[-1].completion_tokens < 200
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and stats["requests_running"] == 0


def test_overload_and_shutdown_are_typed_errors(tiny_checkpoint):
    base = load_base(str(tiny_checkpoint()), device="cpu")
    engine = AsyncEngine.start(base, None, EngineConfig(num_slots=0, num_kv_blocks=64, max_num_seqs=1, max_queue=1))
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    async def main():
        streams = [engine.submit(prompt_ids=[1, 2], params=params) for _ in range(2)]
        with pytest.raises(QueueFullError):
            engine.submit(prompt_ids=[1, 2], params=params)
        return await asyncio.gather(*(collect(s) for s in streams))

    assert all(items[-1].finish_reason == "length" for items in asyncio.run(main()))
    engine.shutdown()

    async def after():
        engine.submit(prompt_ids=[1], params=params)

    with pytest.raises(EngineStoppedError):
        asyncio.run(after())
