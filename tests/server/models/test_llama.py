"""The decoder (NF4, and unquantized for merged checkpoints) against transformers on tiny random checkpoints of each
supported architecture."""

from __future__ import annotations

import pytest
import torch
import transformers

from loramux.server.engine.batch import Chunk
from loramux.server.engine.model_runner import ModelRunner
from loramux.server.engine.slot_writer import SlotWriter
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.loader import load_base


def reference_with_our_weights(path, ours):
    """transformers' model from the same checkpoint, its linear weights replaced by our dequantized NF4 ones."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for name, module in ours.model.named_modules():
        if isinstance(module, NF4Linear):
            ref.get_submodule(name).weight.data.copy_(module.dequantize())
    return ref


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {}), ("qwen2", {}), ("qwen3", {})],
)
def test_logits_match_transformers(tiny_checkpoint, arch, overrides):
    path = tiny_checkpoint(arch, **overrides)
    base = load_base(str(path), device="cpu")
    ref = reference_with_our_weights(path, base)
    runner = ModelRunner(base.model, block_size=4, num_blocks=4)
    ids = [5, 17, 99, 3, 250, 42, 7]

    (logits,) = runner.run([Chunk(ids, 0, [2, 0], all_logits=True)])  # blocks out of order: paging is exercised
    expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)

    # decoding one token against the cache gives the same logits as running the whole sequence
    (step,) = runner.run([Chunk([11], len(ids), [2, 0])])
    full = ref(torch.tensor([[*ids, 11]])).logits[0, -1:]
    torch.testing.assert_close(step, full, atol=2e-4, rtol=1e-4)


def test_linear_layers_are_nf4(tiny_checkpoint):
    base = load_base(str(tiny_checkpoint()), device="cpu")
    linears = [m for m in base.model.modules() if isinstance(m, NF4Linear)]
    assert len(linears) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    for layer in linears:
        assert layer.packed.dtype == torch.uint8
        assert layer.packed.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit values a byte
        assert layer.quant_state.nested  # double quantization of the absmax constants
        assert layer.quant_state.quant_type == "nf4"
    assert not any(isinstance(m, torch.nn.Linear) for m in base.model.modules())


def test_chat_prompt_uses_the_template(tiny_checkpoint):
    base = load_base(str(tiny_checkpoint()), device="cpu")
    ids = base.chat_prompt_ids([{"role": "user", "content": "hi"}])
    assert base.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_unquantized_logits_match_transformers(tiny_checkpoint, arch):
    """quantize="none": the checkpoint's own weights, so transformers as it loads them is the reference."""
    path = tiny_checkpoint(arch)
    base = load_base(str(path), device="cpu", quantize="none")
    assert base.quantize == "none"
    assert not any(isinstance(m, NF4Linear) for m in base.model.modules())
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    runner = ModelRunner(base.model, block_size=4, num_blocks=4)
    ids = [5, 17, 99, 3, 250, 42, 7]
    (logits,) = runner.run([Chunk(ids, 0, [1, 3], all_logits=True)])
    torch.testing.assert_close(logits, ref(torch.tensor([ids])).logits[0], atol=2e-5, rtol=1e-5)


def test_unquantized_layers_serve_an_adapter_like_peft(tiny_checkpoint, tmp_path):
    import peft

    from loramux.server.models.lora_weights import load_lora
    from tests.conftest import build_adapter

    path = tiny_checkpoint()
    adapter = build_adapter(path, tmp_path / "adapter", r=4, targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
    base = load_base(str(path), device="cpu", quantize="none")
    base.model.allocate_lora_slots(SlotLayout.of(num_slots=2, max_rank=8))
    runner = ModelRunner(base.model, block_size=4, num_blocks=8)
    writer = SlotWriter(base.model)
    writer.write(1, load_lora(adapter, base.config, writer.dtype, b_rank_major=writer.b_rank_major))
    ids = [5, 17, 99, 3, 250, 42, 7]
    adapted, plain = runner.run(
        [Chunk(ids, 0, [0, 1], slot=1, all_logits=True), Chunk(ids, 0, [2, 3], all_logits=True)]
    )

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    expected_plain = ref(torch.tensor([ids])).logits[0]
    expected = peft.PeftModel.from_pretrained(ref, str(adapter)).eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(adapted, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected_plain, atol=2e-5, rtol=1e-5)
    assert (adapted - plain).abs().max() > 0.05  # the adapter changes the answer


def test_auto_keeps_a_merged_checkpoint_unquantized(tiny_checkpoint):
    import json

    from loramux.server.models.checkpoint import MERGE_MARKER

    path = tiny_checkpoint()
    assert load_base(str(path), device="cpu").quantize == "nf4"  # any other base: NF4
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, MERGE_MARKER: {"base": "x", "adapters": []}}))
    assert load_base(str(path), device="cpu").quantize == "none"
    assert load_base(str(path), device="cpu", quantize="nf4").quantize == "nf4"
    with pytest.raises(ValueError, match="auto, nf4 or none"):
        load_base(str(path), device="cpu", quantize="int8")
