"""The engine in its own process and the API side's client: streams of text deltas, errors as the first item, aborts,
overload, a stop string the engine never hears of, shutdown, and an engine process that dies under running
requests (every stream ends, nothing hangs)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from loramux.core.adapter_source import AdapterNotFoundError
from loramux.server.engine.client import EngineClient
from loramux.server.engine.core import CoreSpec, EngineProcess, EngineStartError
from loramux.server.engine.errors import EngineStoppedError, QueueFullError
from loramux.server.engine.llm_engine import EngineConfig
from loramux.server.engine.request import SamplingParams
from tests.server.engine.driving import DirSource

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, peft_helpers):
    """(tiny checkpoint, a DirSource factory with adapter t/a private to tenant acme)."""
    from loadtests.tiny_model import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("core")
    path = make_tiny_checkpoint(root / "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    peft_helpers.add_peft_adapter(model, "a", root, seed=0, b_std=0.2, r=4, target_modules=["q_proj", "v_proj"])
    source = DirSource(root / "source")
    source.publish("t/a", root / "a", tenant="acme")
    return path, source.factory()


def start(world, **config) -> tuple[EngineProcess, EngineClient]:
    path, source = world
    settings = {"num_slots": 2, "max_lora_rank": 8, "num_kv_blocks": 64, **config}
    process = EngineProcess.start(CoreSpec(str(path), "cpu", EngineConfig(**settings), source))
    info = process.wait_ready()
    client = EngineClient(process.address, info, AutoTokenizer.from_pretrained(str(path)), dead=process.dead)
    return process, client


async def collect(stream) -> list:
    return [item async for item in stream]


@pytest.fixture(scope="module", params=[False, True], ids=["sent-after-the-step", "sent-during-the-next"])
def engine(request, world):
    """One engine process for the module: sending each step's outputs at once, or during the next step's forward."""
    process, client = start(world, overlap_outputs=request.param)
    yield process, client
    process.stop()


def run(client: EngineClient, main):
    async def connected():
        await client.connect()
        try:
            return await main()
        finally:
            for task in client._tasks:
                task.cancel()
            client._socket.close()

    return asyncio.run(connected())


def test_streams_deltas_and_counts_and_private_adapters(engine, world):
    process, client = engine
    tokenizer = AutoTokenizer.from_pretrained(str(world[0]))

    async def main():
        streams = [
            client.submit([72, 101, 108], GREEDY, request_id="plain"),
            client.submit([5, 6, 7], GREEDY, adapter="t/a", tenant="acme", request_id="tuned"),
        ]
        items = await asyncio.gather(*(collect(s) for s in streams))
        with pytest.raises(AdapterNotFoundError):  # another tenant's private adapter reads as missing
            await collect(client.submit([1], GREEDY, adapter="t/a", tenant="other", request_id="x"))
        with pytest.raises(AdapterNotFoundError):
            await collect(client.submit([1], GREEDY, adapter="t/missing", request_id="y"))
        return items, await client.stats()

    items, stats = run(client, main)
    for outs in items:
        assert [o.finish_reason for o in outs][-1] == "length" and all(o.finish_reason is None for o in outs[:-1])
        tokens = [t for o in outs for t in o.token_ids]
        assert len(tokens) == outs[-1].completion_tokens == 5 and outs[-1].prompt_tokens == 3
        assert "".join(o.text for o in outs) == tokenizer.decode(tokens, skip_special_tokens=True)
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and stats["adapter_loads"] == 1
    assert process.info.max_model_len == 256 and process.info.vocab_size == 320


def test_abort_and_stop_strings_free_everything(engine):
    _, client = engine
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        stream = client.submit([5] * 30, long, adapter="t/a", tenant="acme", request_id="long")
        first = await stream.__anext__()
        stream.abort()
        rest = await collect(stream)
        # a stop string: its text is known only here; the engine is told to end it
        probe = await collect(client.submit([9, 9, 9], GREEDY, request_id="probe"))
        text = "".join(o.text for o in probe)
        stop = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, stop=[text[2:4]])
        cut = await collect(client.submit([9, 9, 9], stop, request_id="cut"))
        await asyncio.sleep(0.2)
        return first, rest, text, cut, await client.stats()

    first, rest, text, cut, stats = run(client, main)
    assert not first.finished and rest[-1].finish_reason == "abort" and rest[-1].completion_tokens < 200
    assert cut[-1].finish_reason == "stop" and "".join(o.text for o in cut) == text[: text.index(text[2:4])]
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and stats["requests_running"] == 0


def test_overload_is_the_first_item_and_shutdown_refuses_later_requests(world):
    process, client = start(world, num_slots=0, max_num_seqs=1, max_queue=1)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    async def main():
        streams = [client.submit([1, 2], params, request_id=str(i)) for i in range(2)]
        with pytest.raises(QueueFullError):
            await collect(client.submit([1, 2], params, request_id="third"))
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        assert all(items[-1].finish_reason == "length" for items in run(client, main))
    finally:
        process.stop()
    assert not process.alive() and not process.dead.is_set()  # stopped as asked: not dead
    client.close()
    with pytest.raises(EngineStoppedError):
        client.submit([1], params, request_id="late")


def test_an_engine_process_that_dies_ends_every_stream_and_says_so(world):
    process, client = start(world, num_slots=0)
    params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)

    async def main():
        streams = [client.submit([1, 2, 3], params, request_id=str(i)) for i in range(3)]
        await asyncio.gather(*(s.__anext__() for s in streams))
        os.kill(process.process.pid, signal.SIGKILL)
        ended = []
        for stream in streams:
            with pytest.raises(EngineStoppedError):
                await asyncio.wait_for(collect(stream), 30)
            ended.append(stream.request_id)
        return ended

    try:
        assert len(run(client, main)) == 3
        assert process.dead.is_set() and client.dead
        with pytest.raises(EngineStoppedError):
            client.submit([1], params, request_id="after")
    finally:
        process.stop()


def test_an_engine_that_cannot_start_says_why(tmp_path):
    process = EngineProcess.start(CoreSpec(str(tmp_path / "nothing-here"), "cpu", EngineConfig(num_slots=0)))
    with pytest.raises(EngineStartError, match="nothing-here"):
        process.wait_ready()
    process.stop()
