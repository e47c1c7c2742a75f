"""LoRA weights as the engine's CPU cache keeps them."""

from __future__ import annotations

import torch

from loramux.adapters.config import AdapterConfig
from loramux.adapters.weights import LoraModule, LoraWeights


def test_packed_converts_every_matrix_into_one_buffer_and_keeps_the_values():
    torch.manual_seed(0)
    modules = {
        "model.layers.0.self_attn.q_proj": LoraModule(torch.randn(4, 16), torch.randn(16, 4), 2.0),
        "model.layers.0.mlp.down_proj": LoraModule(torch.randn(8, 32), torch.randn(16, 8), 0.5),
    }
    weights = LoraWeights(AdapterConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]), modules)

    packed = weights.packed(torch.bfloat16)

    assert packed.nbytes() == weights.nbytes() // 2  # bf16: half the bytes the cache counts
    assert packed.max_rank == 8
    storages = set()
    for name, module in weights.modules.items():
        got = packed.modules[name]
        assert got.a.dtype == got.b.dtype == torch.bfloat16
        assert got.a.shape == module.a.shape and got.b.shape == module.b.shape
        assert got.scaling == module.scaling
        torch.testing.assert_close(got.a.float(), module.a, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got.b.float(), module.b, atol=1e-2, rtol=1e-2)
        storages.update({got.a.untyped_storage().data_ptr(), got.b.untyped_storage().data_ptr()})
    assert len(storages) == 1
    assert weights.modules["model.layers.0.self_attn.q_proj"].a.dtype == torch.float32  # the original is untouched
