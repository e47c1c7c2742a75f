"""Resolving base models: the default one converted once, local directories, and clear errors."""

from __future__ import annotations

import json

import pytest

from loramux.core.model_config import UnsupportedModelError
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.models import checkpoint
from loramux.server.models.checkpoint import BaseModelError, load_state_dict, resolve_base
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


def test_the_default_base_samples_with_its_model_cards_settings(default_base_dir, default_base, tmp_path):
    """The converted default model's generation_config.json carries the settings its model card samples with, and
    the loaded base offers them as request defaults; a conversion made before they were added gets them too."""
    config = json.loads((default_base_dir / "generation_config.json").read_text())
    assert config["temperature"] == 0.2 and config["top_p"] == 0.9 and config["eos_token_id"] == 2
    assert default_base.generation_defaults == {"temperature": 0.2, "top_p": 0.9}

    older = tmp_path / "generation_config.json"
    older.write_text(json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}))
    checkpoint._add_default_sampling(older)
    assert json.loads(older.read_text()) == {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.2,
        "top_p": 0.9,
    }  # fmt: skip
    edited = {"_from_model_config": True, "temperature": 0.7}  # settings someone chose stay as they are
    older.write_text(json.dumps(edited))
    checkpoint._add_default_sampling(older)
    assert json.loads(older.read_text()) == edited


def test_generation_defaults_are_read_and_checked(tmp_path, caplog):
    assert checkpoint.load_generation_defaults(tmp_path) == {}  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 300,
             "min_p": 2.0, "do_sample": True, "eos_token_id": [1, 2]}
        )
    )  # fmt: skip
    defaults = checkpoint.load_generation_defaults(tmp_path)
    assert defaults == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 300
    }  # fmt: skip
    assert "min_p=2.0" in caplog.text  # out of range: left out, said
    (tmp_path / "generation_config.json").write_text("{not json")
    assert checkpoint.load_generation_defaults(tmp_path) == {}


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
