"""Helpers for the engine tests: a directory-backed adapter source and PEFT adapters built in the test."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.server.engine.driving import DirSource


@pytest.fixture
def dir_source(tmp_path: Path) -> DirSource:
    return DirSource(tmp_path / "source")


def add_peft_adapter(model, name: str, out_dir: Path, seed: int, b_std: float = 0.02, **lora_kwargs):
    """Add a LoRA named `name` to `model` (a transformers model, or a PeftModel from an earlier call), give it
    random B matrices so that it changes the output, and save it under out_dir/name. Returns the PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs)
    torch.manual_seed(seed)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if f"lora_B.{name}." in param_name:
                p.normal_(0, b_std)
    staging = out_dir / f".saving-{name}"
    model.save_pretrained(str(staging), selected_adapters=[name])  # PEFT writes a named adapter to staging/name
    shutil.move(str(staging / name), str(out_dir / name))
    shutil.rmtree(staging)
    return model


def reference_logits(peft_model, name: str | None, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Logits (len(output_ids), vocab) of the reference model running this request alone with adapter `name`."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        if name is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=ids).logits[0]
        else:
            peft_model.set_adapter(name)
            logits = peft_model(input_ids=ids).logits[0]
    start = len(prompt_ids) - 1
    return logits[start : start + len(output_ids)].float()


@pytest.fixture(scope="session")
def peft_helpers() -> SimpleNamespace:
    """The helpers above for test modules (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(DirSource=DirSource, add_peft_adapter=add_peft_adapter, reference_logits=reference_logits)
