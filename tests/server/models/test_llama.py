"""The NF4 decoder against transformers on tiny random checkpoints of each supported architecture."""

from __future__ import annotations

import pytest
import torch
import transformers

from loramux.server.engine.batch import Chunk
from loramux.server.engine.model_runner import ModelRunner
from loramux.server.layers.nf4_linear import NF4Linear
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
