"""The batched multi-adapter engine against transformers + PEFT, on the real SmolLM2 in NF4.

The reference is transformers' model from the same checkpoint with its linear weights replaced by our dequantized
NF4 weights, with the same adapters loaded by PEFT, running each request alone. Every request of a mixed batch
(several adapters of ranks 4 to 32, different target modules, rsLoRA, rank/alpha patterns, and the base) must get
the reference's logits at every step and the same greedy tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from loramux.core.adapter_source import AdapterNotFoundError
from loramux.core.model_config import LINEAR_MODULES
from loramux.server.engine.errors import AdapterTooLargeError, ContextLengthError
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.models.lora_weights import AdapterMismatchError
from tests.server.engine.driving import Driver

pytestmark = pytest.mark.slow

ALL_LINEAR = list(LINEAR_MODULES)

# the four kinds the parity family must cover, then more adapters for the slot-rotation test
SPECS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "rs16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "pat32": dict(
        r=32,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        rank_pattern={"down_proj": 12},
        alpha_pattern={"gate_proj": 4},
    ),
}
for i in range(6):
    SPECS[f"extra{i}"] = dict(r=(4, 8, 16, 32)[i % 4], lora_alpha=16, target_modules=ALL_LINEAR[i : i + 3])

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "My favourite colour is", "Water boils at"]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, capture_logits=True)


@pytest.fixture(scope="module")
def world(default_base, default_base_dir, tmp_path_factory, peft_helpers):
    """(base, reference PeftModel holding every adapter, DirSource publishing them as t/NAME)."""
    tmp = tmp_path_factory.mktemp("parity")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(default_base_dir), dtype=torch.float32).eval()
    for name, module in default_base.model.named_modules():
        if isinstance(module, NF4Linear):
            ref.get_submodule(name).weight.data.copy_(module.dequantize())
    source = peft_helpers.DirSource(tmp / "source")
    peft_model = ref
    for seed, (name, spec) in enumerate(SPECS.items()):
        peft_model = peft_helpers.add_peft_adapter(peft_model, name, tmp, seed=seed, b_std=0.04, **spec)
        source.publish(f"t/{name}", tmp / name)
    return default_base, peft_model.eval(), source, peft_helpers.reference_logits


def prompt_ids(base, i: int) -> list[int]:
    return base.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]


def check_against_reference(world, requests, outputs) -> None:
    _base, peft_model, _source, reference_logits = world
    for (ids, adapter), out in zip(requests, outputs, strict=True):
        name = adapter.split("/")[1] if adapter else None
        expected = reference_logits(peft_model, name, ids, out.token_ids)
        assert out.logits.shape == expected.shape
        torch.testing.assert_close(out.logits, expected, atol=1e-3, rtol=1e-3, msg=f"adapter {adapter}")
        assert out.token_ids == expected.argmax(-1).tolist(), f"greedy tokens differ for {adapter}"
        if name is not None:  # the adapter matters: without it the logits are clearly different
            plain = reference_logits(peft_model, None, ids, out.token_ids)
            assert (plain - expected).abs().max() > 0.1


def assert_all_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0
    assert stats["slots_used"] == 0
    assert stats["requests_running"] == stats["requests_waiting"] == 0


def test_mixed_batch_matches_peft_per_request(world):
    base, _peft_model, source, _reference = world
    adapters = ["t/qv4", "t/all8", "t/rs16", "t/pat32", None, "t/qv4"]
    requests = [(prompt_ids(base, i), a) for i, a in enumerate(adapters)]
    engine = LLMEngine(base, source, EngineConfig(num_slots=4, max_lora_rank=32, num_kv_blocks=32, block_size=8))
    outputs = engine.generate([ids for ids, _ in requests], GREEDY, [a for _, a in requests])
    check_against_reference(world, requests, outputs)
    assert all(o.finish_reason in ("length", "stop") for o in outputs)
    assert_all_free(engine)
    engine.shutdown()


def test_answer_does_not_depend_on_batch_mates_or_arrival(world):
    """Other batch mates, later arrival, prompts prefilled in chunks of 3 across steps: still the reference."""
    base, _peft_model, source, _reference = world
    adapters = [None, "t/pat32", "t/rs16", "t/all8", "t/qv4"]
    requests = [(prompt_ids(base, i + 2), a) for i, a in enumerate(adapters)]
    config = EngineConfig(num_slots=4, max_lora_rank=32, num_kv_blocks=32, block_size=4, max_num_batched_tokens=3)
    engine = LLMEngine(base, source, config)
    driver = Driver(engine)

    def submit(i: int) -> None:
        ids, adapter = requests[i]
        driver.add(str(i), ids, GREEDY, adapter)

    submit(0)
    submit(1)
    for _ in range(3):  # the first two are under way before the others arrive
        driver.step()
    for i in range(2, len(requests)):
        submit(i)
    driver.run()
    got = [SimpleNamespace(token_ids=driver.tokens(str(i)), logits=driver.logits(str(i))) for i in range(len(requests))]
    check_against_reference(world, requests, got)
    assert_all_free(engine)
    engine.shutdown()


def test_three_slots_serve_ten_adapters(world):
    base, _peft_model, source, _reference = world
    adapters = [f"t/{name}" for name in SPECS] + [None, None]
    assert len(adapters) == 12
    requests = [(prompt_ids(base, i), a) for i, a in enumerate(adapters)]
    params = SamplingParams(max_tokens=2, temperature=0.0, capture_logits=True)
    engine = LLMEngine(base, source, EngineConfig(num_slots=3, max_lora_rank=32, num_kv_blocks=64, block_size=8))
    outputs = engine.generate([ids for ids, _ in requests], params, [a for _, a in requests])
    check_against_reference(world, requests, outputs)
    stats = engine.stats()
    assert stats["slots_total"] == 3
    assert stats["adapter_slot_loads"] >= 10  # each adapter went through a slot
    assert_all_free(engine)
    engine.shutdown()


def test_bad_input_is_refused_and_the_engine_keeps_serving(world, tiny_checkpoint, tmp_path, peft_helpers):
    base, _peft_model, source, _reference = world
    # an adapter trained on another base (hidden size 64): its shapes do not fit SmolLM2
    tiny = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint()), dtype=torch.float32)
    peft_helpers.add_peft_adapter(tiny, "foreign", tmp_path, seed=0, r=4, target_modules=["q_proj"])
    source.publish("t/foreign", tmp_path / "foreign")
    engine = LLMEngine(base, source, EngineConfig(num_slots=2, max_lora_rank=16, num_kv_blocks=16, block_size=8))
    ids = prompt_ids(base, 0)
    with pytest.raises(AdapterNotFoundError):
        engine.generate([ids], GREEDY, ["t/nope"])
    with pytest.raises(AdapterMismatchError, match="another base"):
        engine.generate([ids], GREEDY, ["t/foreign"])
    with pytest.raises(AdapterTooLargeError, match="rank 32"):
        engine.generate([ids], GREEDY, ["t/pat32"])
    with pytest.raises(ContextLengthError, match="at most 127 prompt tokens"):
        engine.input_processor().prompt_ids(prompt_ids=[1] * 500)
    # and it still serves, with an adapter, exactly
    (out,) = engine.generate([ids], GREEDY, ["t/rs16"])
    check_against_reference(world, [(ids, "t/rs16")], [out])
    assert_all_free(engine)
    engine.shutdown()
