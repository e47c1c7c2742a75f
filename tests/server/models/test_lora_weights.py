"""Reading LoRA weights, and the form the engine's CPU cache keeps them in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.core.adapter_config import AdapterConfig, AdapterConfigError
from loramux.server.models.lora_weights import LoraModule, LoraWeights, load_lora


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

    rank_major = weights.packed(torch.bfloat16, b_rank_major=True)  # B's part of the buffer holds Bᵀ
    assert rank_major.buffer is not None and rank_major.nbytes() == packed.nbytes()
    offset = 0
    for name, module in rank_major.modules.items():
        torch.testing.assert_close(module.a, packed.modules[name].a, rtol=0, atol=0)
        torch.testing.assert_close(module.b, packed.modules[name].b, rtol=0, atol=0)
        assert module.b.shape == packed.modules[name].b.shape and module.b.t().is_contiguous()
        assert module.b.data_ptr() == rank_major.buffer.data_ptr() + (offset + module.a.numel()) * 2
        offset += module.a.numel() + module.b.numel()


def write_peft(directory: Path, tensors: dict[str, torch.Tensor], r: int = 4) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def lora_tensors(dtype_a: torch.dtype, dtype_b: torch.dtype, layers: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for module, out in (("q_proj", 16), ("v_proj", 8)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 16, generator=gen).to(dtype_a)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=gen).to(dtype_b)
    return tensors


@pytest.mark.parametrize("b_rank_major", [False, True])
@pytest.mark.parametrize(
    ("dtype_a", "dtype_b", "dtype"),
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the file holds the buffer as it is: read in place
        (torch.float32, torch.float32, torch.bfloat16),  # converted tensor by tensor
        (torch.float32, torch.float16, torch.float32),  # A and B of other dtypes: the file is not in module order
    ],
)
def test_load_lora_reads_every_matrix_into_one_buffer_in_the_dtype_asked(
    tmp_path, dtype_a, dtype_b, dtype, b_rank_major
):
    tensors = lora_tensors(dtype_a, dtype_b)
    directory = write_peft(tmp_path / "adapter", tensors)
    given = []

    def allocate(nbytes: int) -> torch.Tensor:
        given.append(torch.zeros(nbytes + 7, dtype=torch.uint8)[:nbytes])
        return given[-1]

    weights = load_lora(directory, dtype=dtype, allocate=allocate, b_rank_major=b_rank_major)

    assert len(weights.modules) == 6 and weights.max_rank == 4
    assert weights.buffer is not None and weights.buffer.dtype == dtype
    assert weights.buffer.data_ptr() == given[0].data_ptr()  # the buffer `allocate` gave
    assert weights.nbytes() == given[0].numel()  # no gaps
    expected = load_file(str(directory / "adapter_model.safetensors"))
    offset = 0
    for name, module in weights.modules.items():  # name order, A then B, back to back
        for tensor, part in ((module.a, "A"), (module.b, "B")):
            assert tensor.dtype == dtype
            assert tensor.data_ptr() == weights.buffer.data_ptr() + offset * dtype.itemsize
            offset += tensor.numel()
            want = expected[f"base_model.model.{name}.lora_{part}.weight"].to(dtype)
            torch.testing.assert_close(tensor, want, rtol=0, atol=0)
            # the buffer holds B, or with b_rank_major its transpose, back to back with the rest
            assert (tensor.t() if part == "B" and b_rank_major else tensor).is_contiguous()
        assert module.scaling == 2.0


def test_load_lora_turns_b_rank_major_where_layers_differ(tmp_path):
    """B is turned in runs of one projection across layers; a layer without v_proj breaks q_proj's run in two."""
    tensors = lora_tensors(torch.bfloat16, torch.bfloat16, layers=5)
    for part in ("A", "B"):
        del tensors[f"base_model.model.model.layers.2.self_attn.v_proj.lora_{part}.weight"]
    directory = write_peft(tmp_path / "adapter", tensors)

    rows = load_lora(directory, dtype=torch.bfloat16)
    turned = load_lora(directory, dtype=torch.bfloat16, b_rank_major=True)

    assert len(turned.modules) == 9 and turned.modules.keys() == rows.modules.keys()
    for name, module in turned.modules.items():
        torch.testing.assert_close(module.a, rows.modules[name].a, rtol=0, atol=0)
        torch.testing.assert_close(module.b, rows.modules[name].b, rtol=0, atol=0)
        assert module.b.t().is_contiguous() and module.b.data_ptr() == module.a.data_ptr() + module.a.numel() * 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_lora_names_the_module_with_non_finite_values(tmp_path, value, dtype):
    tensors = lora_tensors(torch.float32, torch.float32)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][2, 1] = value
    directory = write_peft(tmp_path / "adapter", tensors)
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.1\.self_attn\.v_proj has NaN or infinite values"):
        load_lora(directory, dtype=dtype, b_rank_major=dtype == torch.bfloat16)


def test_load_lora_refuses_a_truncated_file(tmp_path):
    directory = write_peft(tmp_path / "adapter", lora_tensors(torch.float32, torch.float32))
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AdapterConfigError, match="truncated"):
        load_lora(directory)
