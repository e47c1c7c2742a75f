"""Engine mechanics on a tiny random Llama: chunked prefill, preemption, fairness, slot rotation, abort, stops,
seeds, new revisions, bad parameters, the warm-up's garbage-collector freeze, steps counted by kind."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import transformers

from loramux.core.adapter_source import AdapterRef
from loramux.server.engine.errors import (
    AdapterLoadError,
    ContextLengthError,
    InvalidRequestError,
    QueueFullError,
)
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import RequestStatus, SamplingParams
from loramux.server.models.loader import load_base
from tests.server.engine.driving import Driver

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
    driver = Driver(LLMEngine(base, source, EngineConfig(num_slots=1, num_kv_blocks=64, max_num_seqs=1)))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts(6, 5)):
        driver.add(f"A{i}", ids, params, tenant="A")
    driver.step()
    driver.add("B0", [5, 6], params, tenant="B")
    driver.run()
    assert driver.finished[:3] == ["A0", "B0", "A1"]


def test_slot_rotation_lets_a_waiting_adapter_in(tiny):
    """One slot: requests for t/a keep arriving, yet the waiting t/b request gets the slot before the later ones."""
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=1, max_lora_rank=8, num_kv_blocks=64))
    driver = Driver(engine)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    driver.add("a0", [1, 2, 3], params, "t/a")
    driver.add("a1", [1, 2, 3], params, "t/a")
    driver.add("b0", [1, 2, 3], params, "t/b")
    # until b0's adapter is read and b0 waits for the slot (while it is still being read, it waits for nothing)
    while "b0" not in engine.requests or engine.requests["b0"].status is RequestStatus.RESOLVING:
        driver.step()
    driver.step()
    driver.add("a2", [1, 2, 3], params, "t/a")
    driver.add("a3", [1, 2, 3], params, "t/a")
    driver.run()
    finished = driver.finished
    assert sorted(finished) == ["a0", "a1", "a2", "a3", "b0"]
    assert finished.index("b0") < finished.index("a2")
    assert engine.stats()["slots_used"] == 0


def test_a_slot_write_that_fails_ends_the_requests_waiting_for_it_and_the_engine_goes_on(tiny):
    """The device refusing an adapter's copies (out of memory, say) ends the requests that wait for that slot with
    AdapterLoadError; the others are served, the slot is free again, and the adapter loads on a later request."""
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    write = engine.writer.write
    refused, refusing = [], [True]

    def refuse_b(index, weights, after):
        if refusing[0] and weights.config is source_config(engine, "t/b"):
            refused.append(index)
            raise RuntimeError("CUDA out of memory")
        return write(index, weights, after)

    engine.writer.write = refuse_b  # type: ignore[method-assign]
    ids = prompts(4, 5)
    adapters = ["t/a", "t/b", "t/b", None]
    expected = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64)).generate(
        ids, GREEDY, adapters
    )
    driver = Driver(engine)
    for i, (prompt, adapter) in enumerate(zip(ids, adapters, strict=True)):
        driver.add(str(i), prompt, GREEDY, adapter)
    driver.run(max_steps=500)  # bounded: a request left waiting for the failed slot would never end
    assert refused
    for i in ("1", "2"):  # both waited for t/b's slot: one error each, nothing else
        (only,) = driver.outputs[i]
        assert isinstance(only.error, AdapterLoadError) and "t/b" in str(only.error) and not only.token_ids
    for i in (0, 3):
        assert driver.tokens(str(i)) == expected[i].token_ids
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
    driver = Driver(engine)
    p = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, adapter in enumerate(["t/a", None]):
        driver.add(str(i), [3] * 20, p, adapter)
    while engine.stats()["requests_running"] < 2:
        driver.step()
    driver.step()
    assert engine.stats()["kv_blocks_used"] > 0 and engine.stats()["slots_used"] == 1
    engine.abort("0")
    engine.abort("1")
    stats = engine.stats()  # at once, before any step
    assert stats["kv_blocks_used"] == 0 and stats["slots_used"] == 0 and not engine.requests
    driver.step()
    assert not engine.has_unfinished()
    assert driver.finish_reason("0") == driver.finish_reason("1") == "abort"
    assert 0 < len(driver.tokens("0")) < 100


def test_the_hook_runs_once_the_forward_is_queued_and_before_the_tokens_are_read(tiny):
    """`step(on_forward_queued)`: where the engine process sends the previous step's outputs while the device
    computes. It runs right after each forward is queued; the step's own outputs come back after it."""
    base, source, _ = tiny
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    driver = Driver(engine)
    driver.add("r", [3] * 5, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), "t/a")
    order: list[str] = []
    runs = engine.runner.run
    engine.runner.run = lambda chunks: order.append("forward") or runs(chunks)  # type: ignore[method-assign]
    while not driver.finished:
        if driver.step(lambda: order.append("hook")):
            order.append("outputs")
    steps = ",".join(order).split("forward,")[1:]
    assert len(steps) == 3 and all(step.startswith("hook,outputs") for step in steps)
    assert len(driver.tokens("r")) == 3 and driver.finish_reason("r") == "length"


def test_steps_are_counted_by_kind_with_their_prompt_tokens(tiny):
    base = tiny[0]
    engine = LLMEngine(base, None, EngineConfig(num_slots=0, num_kv_blocks=64))
    driver = Driver(engine)
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    driver.add("a", [3] * 7, p)
    driver.add("b", [5] * 9, p)
    driver.step()  # both prompts
    driver.step()  # a token each
    driver.add("c", [4] * 6, p)
    driver.step()  # c's prompt beside a's and b's tokens
    stats = engine.stats()
    assert (stats["steps_prefill"], stats["steps_decode"], stats["steps_mixed"]) == (1, 1, 1)
    assert stats["step_prompt_tokens_prefill"] == 16 and stats["step_prompt_tokens_mixed"] == 6
    assert stats["step_prompt_tokens_decode"] == 0
    driver.run()  # a's and b's last token beside c's second, then c's third and fourth
    stats = engine.stats()
    assert stats["steps_mixed"] == 1 and stats["steps_prefill"] == 1 and stats["steps_decode"] == 4
    driver.add("d", [6], p)  # a prompt of one token is a prefill all the same
    driver.step()
    stats = engine.stats()
    assert stats["steps_prefill"] == 2 and stats["step_prompt_tokens_prefill"] == 17


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
    driver = Driver(engine)
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, logprobs=3, capture_logits=True, ignore_eos=True)
    driver.add("r", [5, 6, 7], params, "t/a")
    driver.run()
    items = driver.outputs["r"]
    assert all(len(item.logprobs) == len(item.token_ids) for item in items)
    (merged,) = engine.generate([[5, 6, 7]], params, ["t/a"])  # the same request again, through `generate`
    assert merged.token_ids == driver.tokens("r")
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
    inputs = engine.input_processor()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        inputs.prompt_ids(prompt="hi", prompt_ids=[1])
    with pytest.raises(InvalidRequestError, match="token ids"):
        inputs.prompt_ids(prompt_ids=[1, 10_000])
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.add("x", [1], SamplingParams(logit_bias={base.config.vocab_size: 1.0}))
    with pytest.raises(InvalidRequestError, match="empty"):
        inputs.prompt_ids(prompt_ids=[])
    with pytest.raises(ContextLengthError, match="at most 63"):
        inputs.prompt_ids(prompt_ids=[1] * 64)
    messages = [{"role": "user", "content": "hi"}]
    assert inputs.prompt_ids(messages=messages) == base.chat_prompt_ids(messages)
    with pytest.raises(InvalidRequestError, match="messages"):
        inputs.prompt_ids(messages=[{"role": "user"}])
    params = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequestError, match="not an adapter name"):
        engine.add("x", [1], params, adapter="../etc")
    with pytest.raises(ContextLengthError):
        engine.add("x", [1] * 64, params)
    driver = Driver(engine)
    driver.add("a", [1], params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        driver.add("a", [1], params)
    driver.add("b", [1], params)
    with pytest.raises(QueueFullError):
        driver.add("c", [1], params)
    driver.run()  # the accepted ones still complete
    assert driver.finished == ["a", "b"] and engine.stats()["kv_blocks_used"] == 0
    # (a new engine takes over the base's KV cache and slots: one engine per loaded base)
    slotless = LLMEngine(base, source, EngineConfig(num_slots=0, num_kv_blocks=8))
    with pytest.raises(InvalidRequestError, match="base model only"):
        slotless.add("x", [1], params, adapter="t/a")


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


def test_an_adapter_in_slot_memory_is_not_read_again_after_the_cpu_cache_let_it_go(tiny):
    base, source, _ = tiny
    # a CPU cache that holds one of these adapters: reading t/b lets t/a go, which stays in its slot
    sizing = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64))
    one = int(1.5 * sizing.adapters.fetch(AdapterRef.parse("t/a"), None)[1].nbytes())
    sizing.shutdown()
    config = EngineConfig(num_slots=2, max_lora_rank=8, num_kv_blocks=64, adapter_cache_bytes=one)
    engine = LLMEngine(base, source, config)
    (first,) = engine.generate([[10, 20, 30]], GREEDY, ["t/a"])
    engine.generate([[10, 20, 30]], GREEDY, ["t/b"])
    assert engine.stats()["adapter_cache_entries"] == 1 and engine.stats()["adapter_loads"] == 2
    (again,) = engine.generate([[10, 20, 30]], GREEDY, ["t/a"])
    stats = engine.stats()
    assert stats["adapter_loads"] == 2 and stats["adapter_fetches_in_slots"] == 1  # served from its slot, unread
    assert again.token_ids == first.token_ids
    torch.testing.assert_close(again.logits, first.logits)
