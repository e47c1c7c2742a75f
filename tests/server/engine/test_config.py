"""The engine's configuration: bad values refused up front, the slot layout derived once, the defaults that depend on
the device decided when the engine starts, and a line on each choice."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from loramux.server.engine.config import CPU_DEFAULTS, EngineConfig, fit_to_device


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_slots": -1}, "num_slots must be positive"),
        ({"max_lora_rank": 0}, "max_lora_rank must be positive"),
        ({"max_num_seqs": 0}, "max_num_seqs must be positive"),
        ({"adapter_cache_bytes": -1}, "adapter_cache_bytes must not be negative"),
        ({"adapter_reader_processes": -2}, "adapter_reader_processes must not be negative"),
        ({"num_slots": 4, "max_lora_rank": 64, "slot_page_rank": 24}, "page rank 24 must divide max rank 64"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**fields)


def test_the_slot_layout_follows_the_settings():
    layout = EngineConfig(num_slots=4, max_lora_rank=64).slot_layout
    assert (layout.num_slots, layout.max_rank, layout.page_rank, layout.pages) == (4, 64, 8, 32)
    assert EngineConfig(num_slots=2, max_lora_rank=64, slot_page_rank=64).slot_layout.pages == 2


def test_on_the_cpu_the_unset_fields_take_the_cpus_defaults_and_each_choice_is_noted():
    cpu = SimpleNamespace(device=torch.device("cpu"))
    config, notes = fit_to_device(EngineConfig(max_num_seqs=8), cpu)
    assert config.max_num_seqs == 8  # given: kept
    assert config.num_slots == CPU_DEFAULTS["num_slots"] and config.max_num_batched_tokens == 512
    assert config.adapter_reader_processes == 0
    assert "slots 4 (the CPU's default)" in notes and "adapter-readers 0 (the CPU's default)" in notes
    assert not any("max-num-seqs" in note for note in notes)
    assert fit_to_device(config, cpu) == (config, [])  # nothing left to decide


def test_the_config_module_imports_no_torch():
    code = "import sys, loramux.server.engine.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
