"""Validation of adapter directories without torch: what a push is refused for, and why."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loramux.core.adapter_config import AdapterConfigError
from loramux.core.validate import (
    AdapterValidationError,
    Limits,
    read_safetensors_header,
    validate_adapter_dir,
)


@pytest.fixture
def adapter(make_adapter, tmp_path):
    """A writable copy of a valid rank-4 PEFT adapter on q_proj and v_proj."""
    return shutil.copytree(make_adapter(), tmp_path / "adapter")


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_a_peft_adapter_is_accepted_with_what_it_holds(make_adapter):
    summary = validate_adapter_dir(make_adapter(r=8, targets=("q_proj", "v_proj", "down_proj")))
    assert summary.max_rank == 8
    assert summary.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert summary.config.lora_alpha == 16
    assert len(summary.ranks) == 6  # 3 projections x 2 layers


def test_rank_pattern_is_checked_against_the_tensors(make_adapter, tmp_path):
    directory = make_adapter(r=4, rank_pattern={"v_proj": 8})
    summary = validate_adapter_dir(directory)
    assert summary.ranks["model.layers.0.self_attn.v_proj"] == 8
    assert summary.ranks["model.layers.0.self_attn.q_proj"] == 4
    copy = shutil.copytree(directory, tmp_path / "copy")
    edit_config(copy, rank_pattern={})
    with pytest.raises(AdapterValidationError, match="do not match rank 4"):
        validate_adapter_dir(copy)


def test_pickle_weights_are_refused_with_how_to_convert(adapter):
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterValidationError, match="safe_serialization=True"):
        validate_adapter_dir(adapter)


def test_unsupported_features_are_named(adapter):
    edit_config(adapter, use_dora=True, modules_to_save=["lm_head"])
    with pytest.raises(AdapterConfigError, match=r"DoRA \(use_dora\).*modules_to_save"):
        validate_adapter_dir(adapter)


def test_truncated_weights_are_refused(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterValidationError, match="truncated"):
        validate_adapter_dir(adapter)


def test_a_header_claiming_a_huge_size_is_refused(adapter):
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(AdapterValidationError, match="header claims"):
        validate_adapter_dir(adapter)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(adapter, bad):
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(n for n in tensors if "lora_B" in n)[0]
    tensors[name][0, 0] = bad
    save_file(tensors, str(weights))
    with pytest.raises(AdapterValidationError, match="NaN or infinite"):
        validate_adapter_dir(adapter)


def test_bf16_infinity_is_found_without_a_bf16_dtype(adapter):
    # bf16 has no numpy dtype: write the header by hand, one value 0x7F80 (+inf).
    weights = adapter / "adapter_model.safetensors"
    tensors = {n: t.astype(np.float32) for n, t in load_file(str(weights)).items()}
    header, blobs, offset = {}, [], 0
    for name, t in sorted(tensors.items()):
        raw = (t.view(np.uint32) >> 16).astype("<u2")  # fp32 -> bf16 by truncation
        if name == sorted(tensors)[1]:
            raw.reshape(-1)[0] = 0x7F80
        data = raw.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    assert {t.dtype for t in read_safetensors_header(weights).values()} == {"BF16"}
    with pytest.raises(AdapterValidationError, match="NaN or infinite"):
        validate_adapter_dir(adapter)


def test_limits_on_rank_and_file_count(make_adapter, adapter):
    with pytest.raises(AdapterValidationError, match="over the limit of 4"):
        validate_adapter_dir(make_adapter(r=8), Limits(max_rank=4))
    for i in range(3):
        (adapter / f"note{i}.txt").write_text("x")
    with pytest.raises(AdapterValidationError, match="too many files"):
        validate_adapter_dir(adapter, Limits(max_files=4))


def test_missing_files_are_named(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors is missing"):
        validate_adapter_dir(adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterValidationError, match="adapter_config.json is missing"):
        validate_adapter_dir(adapter)
