"""Engine mechanics on a tiny random Llama: chunked prefill, preemption, fairness, slot rotation, abort, stops,
seeds, new revisions, bad parameters, the warm-up's garbage-collector freeze."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
import transformers

from loramux.adapters.source import AdapterRef
from loramux.server.engine.engine import EngineConfig, LLMEngine
from loramux.server.engine.errors import (
    AdapterLoadError,
    ContextLengthError,
    InvalidRequestError,
    QueueFullError,
)
from loramux.server.engine.llm_engine import merge_outputs
from loramux.server.engine.request import RequestOutput, RequestStatus, SamplingParams
from loramux.server.models.loader import load_base

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, capture_logits=True)


@pytest.fixture
def tiny(tiny_checkpoint, tmp_path, peft_helpers):
    """(base, source with adapters t/a and t/b, reference PeftModel with them as "a" and "b")."""
    path = tiny_checkpoint()
    base = load_base(str(path), device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for name, module in base.model.lora_modules().items():
        ref.get_submodule(name).weight.data.copy_(module.dequantize())
    source = peft_helpers.DirSource(tmp_path / "source")
    peft_model = ref
    for seed, name in enumerate(("a", "b", "c")):
        peft_model = peft_helpers.add_peft_adapter(
            peft_model, name, tmp_path, seed=seed, b_std=0.2, r=4, target_modules=["q_proj", "v_proj", "down_proj"]
        )
        source.publish(f"t/{name}", tmp_path / name)
    return base, source, peft_model.eval()


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 250 + 1 for j in range(length)] for i in range(n)]


def run(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        if not engine.step():
            engine.wait_for_work(0.05)


def test_chunked_prefill_and_preemption_give_the_same_answers(tiny):
    base, source, _ = tiny
    ids = prompts(4, 30)
    tight_config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=17, block_size=4, max_num_batched_tokens=8)
    roomy_config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, block_size=4)

    # Adapters: 8-token steps prefill each prompt in 4 chunks, and 17 blocks of 4 cannot hold two 36-token requests.
    # Whether adapter requests overlap (and so get preempted) depends on when their adapters finish loading.
    adapters = ["t/a", None, "t/b", "t/a"]
    expected = LLMEngine(base, source, roomy_config).generate(ids, GREEDY, adapters)
    tight = LLMEngine(base, source, tight_config)
    got = tight.generate(ids, GREEDY, adapters)
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e.token_ids
        torch.testing.assert_close(g.logits, e.logits, atol=1e-4, rtol=1e-4)
    assert tight.stats()["kv_blocks_used"] == 0

    # The base alone, no chunking: two requests are prefilled in the first step and decode side by side until both
    # need a ninth block with one left, so preemption happens every time.
    expected = LLMEngine(base, source, roomy_config).generate(ids, GREEDY)
    tight = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=17, block_size=4))
    got = tight.generate(ids, GREEDY)
    assert tight.stats()["preemptions"] > 0
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e.token_ids
        torch.testing.assert_close(g.logits, e.logits, atol=1e-4, rtol=1e-4)
    assert tight.stats()["kv_blocks_used"] == 0


def test_a_tenants_burst_does_not_hold_back_another_tenant(tiny):
    """Policy: least recently served tenant first. B's one request runs right after A's first, not after A's six."""
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=1, num_kv_blocks=64, max_num_seqs=1))
    finished: list[str] = []

    def on_output(item: RequestOutput) -> None:
        if item.finished:
            finished.append(item.request_id)

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts(6, 5)):
        engine.add(engine.make_request(on_output, prompt_ids=ids, params=params, tenant="A", request_id=f"A{i}"))
    engine.step()
    engine.add(engine.make_request(on_output, prompt_ids=[5, 6], params=params, tenant="B", request_id="B0"))
    run(engine)
    assert finished[:3] == ["A0", "B0", "A1"]


def test_slot_rotation_lets_a_waiting_adapter_in(tiny):
    """One slot: requests for t/a keep arriving, yet the waiting t/b request gets the slot before the later ones."""
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=1, max_lora_rank=8, num_kv_blocks=64))
    finished: list[str] = []
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def add(name: str, adapter: str) -> None:
        engine.add(
            engine.make_request(
                lambda o: finished.append(o.request_id) if o.finished else None,
                prompt_ids=[1, 2, 3],
                adapter=adapter,
                params=params,
                request_id=name,
            )
        )

    add("a0", "t/a")
    add("a1", "t/a")
    add("b0", "t/b")
    # until b0's adapter is read and b0 waits for the slot (while it is still being read, it waits for nothing)
    while "b0" not in engine.requests or engine.requests["b0"].status is RequestStatus.RESOLVING:
        engine.step() or engine.wait_for_work(0.1)
    engine.step()
    add("a2", "t/a")
    add("a3", "t/a")
    run(engine)
    assert sorted(finished) == ["a0", "a1", "a2", "a3", "b0"]
    assert finished.index("b0") < finished.index("a2")
    assert engine.stats()["slots_used"] == 0


def test_slot_writes_on_the_step_thread_serve_what_the_loader_thread_does(tiny):
    """One slot, three adapters taking turns: the writes the step loop queues itself give the same tokens and logits
    as writes on the loader thread, and none of them runs on another thread."""
    base, source, _ = tiny
    ids = prompts(6, 7)
    adapters = ["t/a", "t/b", "t/c", None, "t/b", "t/a"]
    outputs, threads = {}, []
    for on_step in (True, False):
        config = EngineConfig(num_slots=1, max_lora_rank=8, num_kv_blocks=64, step_thread_slot_writes=on_step)
        engine = LLMEngine(base, source, config)
        issue = engine.adapters.issue_write
        if issue is not None:
            engine.adapters.issue_write = lambda *a, issue=issue: threads.append(threading.get_ident()) or issue(*a)
        outputs[on_step] = engine.generate(ids, GREEDY, adapters)
        assert engine.stats()["adapter_slot_loads"] >= 4 and engine.adapters.writes_pending() == 0
        engine.shutdown()
    assert len(threads) >= 4 and set(threads) == {threading.get_ident()}  # `generate` steps on this thread
    for got, want in zip(outputs[True], outputs[False], strict=True):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("on_step", [True, False], ids=["step-thread-writes", "loader-thread"])
def test_a_slot_write_that_fails_ends_the_requests_waiting_for_it_and_the_engine_goes_on(tiny, on_step):
    """The device refusing an adapter's copies (out of memory, say) ends the requests that wait for that slot with
    AdapterLoadError; the others are served, the slot is free again, and the adapter loads on a later request."""
    base, source, _ = tiny
    config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, step_thread_slot_writes=on_step)
    engine = LLMEngine(base, source, config)
    write = engine.adapters.issue_write if on_step else engine.adapters.write_slot
    refused, refusing = [], [True]

    def refuse_b(index, weights, after):
        if refusing[0] and weights.config is source_config(engine, "t/b"):
            refused.append(index)
            raise RuntimeError("CUDA out of memory")
        return write(index, weights, after)

    if on_step:
        engine.adapters.issue_write = refuse_b
    else:
        engine.adapters.write_slot = refuse_b
    ids = prompts(4, 5)
    expected = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64)).generate(
        ids, GREEDY, ["t/a", "t/b", "t/b", None]
    )
    items: dict[int, list] = {i: [] for i in range(4)}
    for i, (prompt, adapter) in enumerate(zip(ids, ["t/a", "t/b", "t/b", None], strict=True)):
        engine.add(engine.make_request(items[i].append, prompt_ids=prompt, adapter=adapter, params=GREEDY))
    for _ in range(500):  # bounded: a request left waiting for the failed slot would never end
        if not engine.has_unfinished():
            break
        engine.step() or engine.wait_for_work(0.05)
    assert refused and not engine.has_unfinished()
    for i in (1, 2):  # both waited for t/b's slot: one error each, nothing else
        assert len(items[i]) == 1 and isinstance(items[i][0], AdapterLoadError) and "t/b" in str(items[i][0])
    for i in (0, 3):
        assert merge_outputs(items[i]).token_ids == expected[i].token_ids
    stats = engine.stats()
    assert stats["slots_used"] == 0 and stats["kv_blocks_used"] == 0 and not engine.requests
    assert stats["adapter_slot_write_failures"] == len(refused) >= 1
    refusing[0] = False
    again = engine.generate([ids[1]], GREEDY, ["t/b"])[0]  # the device takes it now
    assert again.token_ids == expected[1].token_ids


def source_config(engine: LLMEngine, name: str):
    """The config object of `name`'s weights in the engine's CPU cache (the test's way to tell adapters apart)."""
    return engine.adapters.fetch(AdapterRef.parse(name), None)[1].config


def test_abort_frees_blocks_and_slot_at_once(tiny):
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    items: list[RequestOutput] = []
    p = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, adapter in enumerate(["t/a", None]):
        request = engine.make_request(items.append, prompt_ids=[3] * 20, adapter=adapter, params=p, request_id=str(i))
        engine.add(request)
    while engine.stats()["requests_running"] < 2:
        engine.step() or engine.wait_for_work(0.05)
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0 and engine.stats()["slots_used"] == 1
    engine.abort("0")
    engine.abort("1")
    engine.step()
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and not engine.has_unfinished()
    assert sorted(o.request_id for o in items if o.finish_reason == "abort") == ["0", "1"]


def test_stop_strings_and_stop_tokens(tiny):
    base = tiny[0]
    engine = LLMEngine(base, None, EngineConfig(num_slots=0, num_kv_blocks=64))
    ids = [[72, 101, 108, 108, 111]]
    (full,) = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert full.finish_reason == "length" and full.completion_tokens == 12
    text = full.text
    stop = text[4:6]
    (cut,) = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    token = full.token_ids[3]
    (by_token,) = engine.generate(
        ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[token])
    )
    first = full.token_ids.index(token)
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == full.token_ids[: first + 1]
    assert by_token.text == base.tokenizer.decode(full.token_ids[:first])


def test_outputs_streamed_during_the_next_step_are_the_ones_streamed_at_once(tiny):
    """`overlap_outputs` (the default on a GPU) streams a step's tokens during the next step: the same tokens, text,
    logits and finish reasons, each request's items in order with exactly one final item, and everything freed; a
    stop string ends its request although the request is already in the next step."""
    base, source, _ = tiny
    ids = prompts(4, 7)
    adapters = ["t/a", None, "t/b", "t/a"]

    def config(overlap: bool) -> EngineConfig:
        return EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, overlap_outputs=overlap)

    at_once = LLMEngine(base, source, config(False))  # one engine on a base at a time: each allocates its slots
    full = at_once.generate(ids, GREEDY, adapters)
    # a stop string met early (so its request is already in the next step when the string is found)
    cut_at, stop = next((i, out.text[1]) for i, out in enumerate(full) if len(out.text) > 2 and out.text[1].isascii())
    cut = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, capture_logits=True, stop=[stop])
    wanted = [(params, at_once.generate(ids, params, adapters)) for params in (GREEDY, cut)]
    at_once.shutdown()
    overlapped = LLMEngine(base, source, config(True))
    assert overlapped.overlap_outputs and not at_once.overlap_outputs
    for params, want in wanted:
        items: dict[int, list[RequestOutput]] = {i: [] for i in range(len(ids))}
        for i, (prompt, adapter) in enumerate(zip(ids, adapters, strict=True)):
            overlapped.add(overlapped.make_request(items[i].append, prompt_ids=prompt, adapter=adapter, params=params))
        run(overlapped)
        for i, expected in enumerate(want):
            finals = [item.finished for item in items[i]]
            assert finals.count(True) == 1 and finals[-1]
            got = merge_outputs(items[i])
            assert (got.token_ids, got.text, got.finish_reason) == (
                expected.token_ids, expected.text, expected.finish_reason)  # fmt: skip
            torch.testing.assert_close(got.logits, expected.logits)
        stats = overlapped.stats()
        assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and not overlapped.has_unfinished()
    want = wanted[1][1]
    assert want[cut_at].finish_reason == "stop" and len(want[cut_at].token_ids) < len(full[cut_at].token_ids)


def test_an_abort_streams_the_tokens_held_back_first(tiny):
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, overlap_outputs=True))
    items: list[RequestOutput] = []
    p = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    engine.add(engine.make_request(items.append, prompt_ids=[3] * 5, adapter="t/a", params=p, request_id="r"))
    while not engine.unsent_count():
        engine.step() or engine.wait_for_work(0.05)
    held = engine.unsent_count()
    engine.abort("r")
    engine.step()
    assert [item.finish_reason for item in items][-1] == "abort"
    assert sum(len(item.token_ids) for item in items) == held
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and not engine.has_unfinished()


def test_tokens_held_back_can_be_dropped_after_a_failure(tiny):
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=0, num_kv_blocks=64, overlap_outputs=True))
    items: list[RequestOutput] = []
    p = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    request = engine.make_request(items.append, prompt_ids=[4, 5, 6], params=p, request_id="x")
    engine.add(request)
    while not engine.unsent_count():
        engine.step() or engine.wait_for_work(0.05)
    assert not engine.requests and engine.has_unfinished()  # ended (its one token), its last output not sent
    assert engine.discard_unsent() == [request]
    assert not engine.has_unfinished() and items == []


def test_same_seed_same_output_whatever_the_batch(tiny):
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, top_k=50, seed=11, ignore_eos=True)
    (alone,) = engine.generate([[9, 8, 7]], params, ["t/a"])
    together = engine.generate([[1, 2], [9, 8, 7], [4] * 9], params, ["t/b", "t/a", None])
    assert together[1].token_ids == alone.token_ids
    other = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, top_k=50, seed=12, ignore_eos=True)
    assert engine.generate([[9, 8, 7]], other, ["t/a"])[0].token_ids != alone.token_ids


def test_logprobs_come_with_every_token_streamed(tiny):
    """One TokenLogprobs per token id of each output, streamed or merged: the log_softmax of the row the token was
    sampled from, and the k largest."""
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    items: list[RequestOutput] = []
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, logprobs=3, capture_logits=True, ignore_eos=True)
    engine.add(engine.make_request(items.append, prompt_ids=[5, 6, 7], adapter="t/a", params=params))
    run(engine)
    assert all(len(item.logprobs) == len(item.token_ids) for item in items)
    merged = merge_outputs(items)
    assert len(merged.logprobs) == len(merged.token_ids) == 5
    reference = torch.log_softmax(merged.logits, dim=-1)
    for row, token, lp in zip(reference, merged.token_ids, merged.logprobs, strict=True):
        assert lp.logprob == pytest.approx(float(row[token]), abs=1e-5)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
    (plain,) = engine.generate([[5, 6, 7]], GREEDY)
    assert plain.logprobs is None


def test_adapters_read_by_reader_processes_serve_what_peft_computes(tiny, peft_helpers):
    base, source, peft_model = tiny
    config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, adapter_reader_processes=2)
    engine = LLMEngine(base, source, config)
    readers = engine.adapters.readers
    assert readers is not None and engine.adapters.arena.fd is not None
    ids = [[10, 20, 30, 40], [5, 6, 7]]
    outs = engine.generate(ids, GREEDY, ["t/a", "t/b"])
    for name, prompt, out in zip("ab", ids, outs, strict=True):
        want = peft_helpers.reference_logits(peft_model, name, prompt, out.token_ids)
        torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=1e-4)
    stats = engine.stats()
    assert stats["adapter_loads"] == 2 and stats["adapter_reader_processes"] == 2
    assert stats["adapter_reader_restarts"] == 0
    processes = [r.process for r in readers._readers]
    engine.shutdown()
    assert all(p.poll() is not None for p in processes)


def test_where_no_memory_file_can_be_made_the_engine_reads_adapters_in_process(tiny, monkeypatch):
    base, source, _ = tiny

    def refuse(*args):
        raise OSError("memfd_create is not allowed here")

    monkeypatch.setattr(os, "memfd_create", refuse)
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, adapter_reader_processes=2))
    assert engine.adapters.readers is None and engine.adapters.arena.fd is None
    (out,) = engine.generate([[10, 20, 30]], GREEDY, ["t/a"])
    assert len(out.token_ids) == GREEDY.max_tokens and engine.stats()["adapter_loads"] == 1
    engine.shutdown()


def test_new_revision_replaces_the_cached_adapter(tiny, tmp_path, peft_helpers):
    base, source, peft_model = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    ids = [[10, 20, 30, 40]]
    (first,) = engine.generate(ids, GREEDY, ["t/a"])
    source.publish("t/a", tmp_path / "b")  # a new revision of t/a with other weights
    (second,) = engine.generate(ids, GREEDY, ["t/a"])
    (third,) = engine.generate(ids, GREEDY, ["t/a"])
    ref = peft_helpers.reference_logits
    torch.testing.assert_close(first.logits, ref(peft_model, "a", ids[0], first.token_ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second.logits, ref(peft_model, "b", ids[0], second.token_ids), atol=1e-4, rtol=1e-4)
    assert third.token_ids == second.token_ids
    stats = engine.stats()
    assert stats["adapter_loads"] == 2 and stats["adapter_cache_hits"] == 1 and stats["adapter_cache_entries"] == 1


def test_bad_requests_are_refused_clearly(tiny):
    base, source, _ = tiny
    engine = LLMEngine(
        base, source, EngineConfig(num_slots=1, num_kv_blocks=64, max_num_seqs=1, max_queue=1, max_model_len=64)
    )
    for kwargs in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"stop": [""]}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kwargs)
    noop = lambda _: None  # noqa: E731
    with pytest.raises(InvalidRequestError, match="exactly one"):
        engine.make_request(noop, prompt="hi", prompt_ids=[1])
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.make_request(noop, prompt_ids=[1, 10_000])
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.make_request(noop, prompt_ids=[1], params=SamplingParams(logit_bias={base.config.vocab_size: 1.0}))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.make_request(noop, prompt_ids=[])
    with pytest.raises(ContextLengthError, match="at most 63"):
        engine.make_request(noop, prompt_ids=[1] * 64)
    with pytest.raises(ValueError, match="not an adapter name"):
        engine.make_request(noop, prompt_ids=[1], adapter="../etc")
    messages = [{"role": "user", "content": "hi"}]
    assert engine.make_request(noop, messages=messages).prompt_ids == base.chat_prompt_ids(messages)
    with pytest.raises(InvalidRequestError, match="messages"):
        engine.make_request(noop, messages=[{"role": "user"}])
    engine.add(engine.make_request(noop, prompt_ids=[1]))
    engine.add(engine.make_request(noop, prompt_ids=[1]))
    with pytest.raises(QueueFullError):
        engine.add(engine.make_request(noop, prompt_ids=[1]))
    run(engine)  # the accepted ones still complete
    assert engine.stats()["kv_blocks_used"] == 0
    # (a new engine takes over the base's KV cache and slots: one engine per loaded base)
    slotless = LLMEngine(base, source, EngineConfig(num_slots=0, num_kv_blocks=8))
    with pytest.raises(InvalidRequestError, match="base model only"):
        slotless.make_request(noop, prompt_ids=[1], adapter="t/a")


def test_warm_up_takes_the_model_out_of_the_collectors_walks_until_shutdown(tiny):
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8))
    try:
        engine.warm_up()
        assert gc.get_freeze_count() > 0
        first = engine.generate([prompts(1, 5)[0]], GREEDY, adapters=["t/a"])[0]
        assert len(first.token_ids) == GREEDY.max_tokens  # it serves as before
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0
