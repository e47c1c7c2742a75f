import bitsandbytes as bnb
import pytest
import torch

from loramux.server.layers.nf4_linear import DIRECT_DEQUANT_MIN_ROWS, NF4Linear, _nf4_dequantize_kernel


def _layer(device: str, dtype: torch.dtype, out_features: int = 384, in_features: int = 256) -> NF4Linear:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.05
    return NF4Linear(weight.to(device), torch.randn(out_features).to(device) * 0.1, dtype)


def test_cpu_forward_multiplies_by_the_dequantized_weight():
    layer = _layer("cpu", torch.float32)
    x = torch.randn(5, layer.in_features)
    assert layer.quant_state.nested  # the stored format: double quantization of the absmax constants
    assert layer.serving_state is None  # the dequantized-constants state is for the GPU only
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + layer.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 48, 300, 2000])
def test_gpu_forward_with_dequantized_constants_matches_bitsandbytes_nested(tokens):
    layer = _layer("cuda", torch.bfloat16)
    assert layer.quant_state.nested and layer.serving_state is not None
    # from DIRECT_DEQUANT_MIN_ROWS rows the layer calls bitsandbytes' dequantize kernel itself: it must be found
    assert tokens < DIRECT_DEQUANT_MIN_ROWS or _nf4_dequantize_kernel(torch.bfloat16) is not None
    assert not layer.serving_state.nested and layer.serving_state.absmax.dtype == torch.float32
    x = torch.randn(tokens, layer.in_features, device="cuda", dtype=torch.bfloat16)
    want = bnb.matmul_4bit(x, layer.packed.t(), quant_state=layer.quant_state, bias=layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-2, atol=1e-2)
    dense = layer.dequantize().float()  # the weight both compute with
    torch.testing.assert_close(layer(x).float(), x.float() @ dense.T + layer.bias.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_state_follows_the_layer_between_devices():
    layer = _layer("cpu", torch.bfloat16)
    assert layer.serving_state is None
    layer.to("cuda")
    assert layer.serving_state is not None and layer.serving_state.absmax.is_cuda
    layer.to("cpu")
    assert layer.serving_state is None
