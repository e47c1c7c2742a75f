"""The unquantized decoder linear layer (a merged checkpoint in bf16) and its LoRA slots."""

from __future__ import annotations

import torch

from loramux.server.layers.linear import DenseLinear
from loramux.server.layers.lora import DenseLoraLinear, LoraGroup
from loramux.server.layers.slots import SlotLayout


def test_dense_linear_computes_with_the_weight_as_given():
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    layer = DenseLinear(weight.to(torch.bfloat16), bias, torch.float32)
    x = torch.randn(5, 32)
    assert layer.weight.dtype == torch.float32 and layer.device.type == "cpu"
    torch.testing.assert_close(layer(x), x @ weight.to(torch.bfloat16).float().T + bias, rtol=0, atol=1e-5)


def test_dense_lora_linear_adds_each_tokens_slot_and_clears():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    layer = DenseLoraLinear(weight, None, torch.float32)
    x = torch.randn(3, 64)
    plain = layer(x)
    torch.testing.assert_close(plain, x @ weight.T)
    layer.allocate_slots(SlotLayout.of(2, 4))
    a, b = torch.randn(2, 64), torch.randn(16, 2)
    layer.write_slot(1, a, b, 3.0)
    slots = torch.tensor([1, -1, 0])
    out = layer(x, slots)
    torch.testing.assert_close(out[0], plain[0] + 3.0 * (x[0] @ a.T) @ b.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:], plain[1:])  # base-only and an empty slot add nothing
    layer.write_slot(1, None, None, 0.0)
    torch.testing.assert_close(layer(x, slots), plain)


def test_a_group_of_dense_layers_serves_its_members_slots():
    torch.manual_seed(2)
    q, v = (
        DenseLoraLinear(torch.randn(8, 64), None, torch.float32),
        DenseLoraLinear(torch.randn(24, 64), None, torch.float32),
    )
    group = LoraGroup([q, v])
    group.allocate_slots(SlotLayout.of(2, 4))
    a, b = torch.randn(3, 64), torch.randn(24, 3)
    v.write_slot(0, a, b, 0.5)  # only v holds an adapter in slot 0
    x = torch.randn(4, 64)
    slots = torch.tensor([0, -1, 0, 1])
    yq, yv = group(x, slots)
    torch.testing.assert_close(yq, x @ q.weight.T)
    want = x @ v.weight.T
    want[slots == 0] += 0.5 * (x[slots == 0] @ a.T) @ b.T
    torch.testing.assert_close(yv, want, atol=1e-4, rtol=1e-4)
