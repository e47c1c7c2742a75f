"""Resolving base models: the default one converted once, local directories, and clear errors."""

from __future__ import annotations

import json

import pytest

from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.models import checkpoint
from loramux.server.models.checkpoint import BaseModelError, load_state_dict, resolve_base
from loramux.server.models.config import UnsupportedModelError
from loramux.server.models.llama import MissingWeightError
from loramux.server.models.loader import load_base


def test_default_base_is_converted_once(default_base_dir, monkeypatch):
    assert (default_base_dir / "model.safetensors").is_file()
    assert (default_base_dir / "tokenizer.json").is_file()
    config = json.loads((default_base_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]

    def fail(*_args):
        raise AssertionError("converted again")

    monkeypatch.setattr(checkpoint, "convert_gguf", fail)
    assert resolve_base(None) == default_base_dir


def test_default_base_answers_in_nf4(default_base):
    assert default_base.config.num_hidden_layers == 30
    ids = default_base.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    engine = LLMEngine(default_base, config=EngineConfig(num_slots=0, num_kv_blocks=8))
    (out,) = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="not found"):
        resolve_base(str(tmp_path / "nope"))
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base(str(tmp_path))


def test_unsupported_architecture_names_the_supported_ones(tiny_checkpoint):
    path = tiny_checkpoint()
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_base(str(path), device="cpu")


def test_pickle_only_checkpoint_is_refused(tiny_checkpoint):
    path = tiny_checkpoint()
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(BaseModelError, match=r"no \.safetensors"):
        load_state_dict(path)


def test_missing_tensor_is_named(tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    path = tiny_checkpoint()
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_base(str(path), device="cpu")
