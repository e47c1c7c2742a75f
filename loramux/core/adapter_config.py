"""A PEFT LoRA `adapter_config.json`, read and checked. Imports no torch: the registry uses it to validate pushes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 256


class AdapterConfigError(ValueError):
    """The adapter's configuration is malformed or asks for something loramux does not support."""


@dataclass
class AdapterConfig:
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
                raise AdapterConfigError(f"{name} must be an integer from 1 to {MAX_RANK}, got {rank!r}")
        for name, alpha in [("lora_alpha", self.lora_alpha), *self.alpha_pattern.items()]:
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
                raise AdapterConfigError(f"lora_alpha for {name} must be a finite number, got {alpha!r}")
        for pattern in [*self.rank_pattern, *self.alpha_pattern] + (
            [self.target_modules] if isinstance(self.target_modules, str) else []
        ):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterConfigError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        """Read a PEFT LoRA config; refuses what loramux cannot serve, naming it."""
        if not isinstance(raw, dict):
            raise AdapterConfigError("adapter_config.json must hold a JSON object")
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise AdapterConfigError(f"peft_type {peft_type!r} is not supported: only LORA adapters are served")
        unsupported = []
        if raw.get("use_dora"):
            unsupported.append("DoRA (use_dora)")
        if raw.get("modules_to_save"):
            unsupported.append(f"modules_to_save {raw['modules_to_save']}")
        if raw.get("fan_in_fan_out"):
            unsupported.append("fan_in_fan_out")
        if raw.get("bias", "none") != "none":
            unsupported.append(f"bias={raw['bias']!r}")
        if raw.get("layers_to_transform") is not None or raw.get("layers_pattern"):
            unsupported.append("layers_to_transform/layers_pattern")
        if raw.get("target_parameters"):
            unsupported.append("target_parameters")
        if raw.get("use_qalora"):
            unsupported.append("QA-LoRA (use_qalora)")
        if raw.get("trainable_token_indices"):
            unsupported.append("trainable_token_indices")
        if unsupported:
            raise AdapterConfigError("unsupported adapter features: " + ", ".join(unsupported))
        if "r" not in raw:
            raise AdapterConfigError("adapter_config.json has no rank 'r'")
        targets = raw.get("target_modules")
        if not targets or not isinstance(targets, (str, list)):
            raise AdapterConfigError("adapter_config.json must name target_modules (a list or a regex)")
        if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
            raise AdapterConfigError("target_modules must be a list of module names")
        rank_pattern = raw.get("rank_pattern") or {}
        alpha_pattern = raw.get("alpha_pattern") or {}
        if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
            raise AdapterConfigError("rank_pattern and alpha_pattern must be JSON objects")
        return cls(
            r=raw["r"],
            lora_alpha=raw.get("lora_alpha", 8),
            target_modules=sorted(targets) if isinstance(targets, list) else targets,
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            raw=raw,
        )

    @classmethod
    def from_file(cls, path: Path) -> AdapterConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise AdapterConfigError(f"{CONFIG_FILE} is missing") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterConfigError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would put a LoRA on `module_name` (e.g. `model.layers.3.self_attn.q_proj`)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def rank_for(self, module_name: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)

    def alpha_for(self, module_name: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA, with the module's own rank and alpha."""
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str:
    # As PEFT matches rank_pattern/alpha_pattern keys: the first key that matches a suffix of the module name.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


def module_name_of(tensor_name: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, `A`).

    None for a tensor that is not a LoRA A/B matrix.
    """
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", tensor_name)
    return (match.group(1), match.group(2)) if match else None
