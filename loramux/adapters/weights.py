"""Reading a PEFT LoRA adapter's tensors and checking them against a base model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramux.adapters.config import (
    CONFIG_FILE,
    LINEAR_MODULES,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterConfigError,
    module_name_of,
)
from loramux.server.models.config import ModelConfig

_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


class AdapterMismatchError(AdapterConfigError):
    """The adapter's tensors do not fit its own config or the base model."""


@dataclass
class LoraModule:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraWeights:
    config: AdapterConfig
    modules: dict[str, LoraModule]  # by module name, e.g. "model.layers.0.self_attn.q_proj"
    buffer: torch.Tensor | None = None  # set by `packed`: the one flat tensor every A and B is a view of

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())

    def packed(self, dtype: torch.dtype, pin_memory: bool = False) -> LoraWeights:
        """A copy with every A and B in `dtype`, as views of one contiguous CPU buffer (page-locked with
        `pin_memory`, so that copies from it to a GPU are asynchronous)."""
        tensors = [t for m in self.modules.values() for t in (m.a, m.b)]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=pin_memory)
        views, offset = [], 0
        for t in tensors:
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            views.append(view)
            offset += t.numel()
        pairs = zip(self.modules.items(), views[0::2], views[1::2], strict=True)
        modules = {name: LoraModule(a, b, m.scaling) for (name, m), a, b in pairs}
        return LoraWeights(self.config, modules, flat)


def base_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder linear layer, by its projection name."""
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def load_lora(directory: Path, base: ModelConfig | None = None) -> LoraWeights:
    """Read `adapter_config.json` + `adapter_model.safetensors` (never pickle) as fp32 tensors on the CPU.

    With `base`, every module must exist in it with matching shapes. Raises `AdapterConfigError` naming the problem.
    """
    directory = Path(directory)
    config = AdapterConfig.from_file(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterConfigError(
                "adapter_model.bin is a pickle file and is never loaded; convert it to safetensors "
                "(PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterConfigError(f"{WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterConfigError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = module_name_of(name)
        if parsed is None:
            raise AdapterMismatchError(f"unexpected tensor {name!r}: only lora_A/lora_B weights are supported")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not pairs:
        raise AdapterMismatchError(f"{WEIGHTS_FILE} holds no LoRA tensors")

    shapes = base_shapes(base) if base is not None else None
    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterMismatchError(f"{module} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"].float(), pair["B"].float()
        rank = config.rank_for(module)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterMismatchError(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not match rank {rank}"
            )
        if not config.targets(module):
            raise AdapterMismatchError(f"{module} has LoRA weights but is not in target_modules")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterMismatchError(f"{module} has NaN or infinite values")
        if shapes is not None:
            _check_fits_base(module, a, b, shapes, base)
        modules[module] = LoraModule(a=a, b=b, scaling=config.scaling_for(module))
    return LoraWeights(config=config, modules=modules)


def _check_fits_base(
    module: str, a: torch.Tensor, b: torch.Tensor, shapes: dict[str, tuple[int, int]], base: ModelConfig
) -> None:
    match = _MODULE.fullmatch(module)
    if match is None or match.group(3) not in LINEAR_MODULES:
        raise AdapterMismatchError(f"{module} is not a decoder linear layer of the base")
    if int(match.group(1)) >= base.num_hidden_layers:
        raise AdapterMismatchError(f"{module}: the base has only {base.num_hidden_layers} layers")
    out_features, in_features = shapes[match.group(3)]
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise AdapterMismatchError(
            f"{module}: adapter maps {a.shape[1]} -> {b.shape[0]} features, the base layer {in_features} -> "
            f"{out_features}; was it trained on another base?"
        )
