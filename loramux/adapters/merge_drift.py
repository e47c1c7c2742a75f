"""How far a merged checkpoint served in NF4 would be from the unmerged NF4 base + adapters it was made of: the
measure every merge reports, since quantizing the merged weights again can erase what an adapter learned."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramux.core.model_config import LINEAR_MODULES
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.models.checkpoint import load_config
from loramux.server.models.lora_weights import LoraWeights, load_lora

if TYPE_CHECKING:
    from loramux.adapters.merge import WeightedAdapter

# The weights of the decoder's linear layers, the ones the server quantizes to NF4 (group 1: the module's name).
LINEAR_WEIGHT = re.compile(rf"(model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(LINEAR_MODULES)}))\.weight")


@dataclass
class Drift:
    """How far the merged model quantized to NF4 again is from the unmerged NF4 base + adapters, on `positions`
    tokens."""

    kl_mean: float  # mean KL(unmerged || requantized merged) of next-token distributions, in nats
    top1_agreement: float  # fraction of positions where both models' most likely next token is the same
    positions: int
    texts: int


# Scored teacher-forced: each position's next-token distribution counts, so a few short texts give ~150 positions.
DRIFT_TEXTS = (
    "The capital of France is Paris, a city known for its museums, its cafes and the Eiffel Tower.",
    "To reverse a list in Python, call its reverse method or take the slice with a step of minus one.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
    "The seasons change because the axis of the Earth is tilted relative to its orbit around the Sun.",
    "Dear team, thank you for your hard work this quarter. We shipped three releases and fixed many bugs.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his curious cat.",
)


@torch.inference_mode()
def measure_drift(base_dir: Path, adapters: Sequence[WeightedAdapter], merged_dir: Path, device: torch.device) -> Drift:
    """Compare the unmerged model (NF4 base + adapters applied beside each layer) with the merged checkpoint
    quantized to NF4 again (what serving `merged_dir` computes with), on `DRIFT_TEXTS`.

    Both run as transformers models whose decoder linear weights are replaced by `dequant(NF4(W))` from the server's
    own quantizer, in the server's compute dtype. Their next-token distributions are compared at every position.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    texts = [tokenizer(text, return_tensors="pt")["input_ids"].to(device) for text in DRIFT_TEXTS]  # (1, T) each

    reference = _nf4_model(base_dir, device)
    loras = [load_lora(a.adapter.path, load_config(base_dir)) for a in adapters]
    _attach_lora(reference, loras, [a.weight for a in adapters])
    expected = [_log_probs(reference, ids) for ids in texts]  # (T, vocab) each
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()

    merged = _nf4_model(merged_dir, device)
    kl_sum, agree, positions = 0.0, 0, 0
    for ids, ref_logp in zip(texts, expected, strict=True):
        logp = _log_probs(merged, ids)
        # KL(p_ref || p_merged) per position: Σ_v p_ref·(log p_ref − log p_merged)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        kl_sum += float(kl.clamp_min(0).sum())
        agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        positions += kl.shape[0]
    return Drift(kl_mean=kl_sum / positions, top1_agreement=agree / positions, positions=positions, texts=len(texts))


def _nf4_model(model_dir: Path, device: torch.device) -> torch.nn.Module:
    """A transformers model of `model_dir` whose decoder linear weights are `dequant(NF4(W))`, as the server's."""
    from transformers import AutoModelForCausalLM

    # The server computes in bf16 on a GPU and in fp32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and LINEAR_WEIGHT.fullmatch(f"{name}.weight"):
            module.weight.data = NF4Linear(module.weight.data, None, dtype).dequantize()
    return model


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, T) -> log-softmax of the next-token logits at every position, (T, vocab) fp32 on the CPU."""
    return torch.log_softmax(model(ids).logits[0].float(), dim=-1).cpu()


def _attach_lora(model: torch.nn.Module, loras: Sequence[LoraWeights], factors: Sequence[float]) -> None:
    """Add `Σ factor·scaling·(x·Aᵀ)·Bᵀ` to each targeted linear layer's output: the adapters unmerged."""
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        parts = []
        for lora, factor in zip(loras, factors, strict=True):
            module = lora.modules.get(name)
            if module is not None and factor != 0:
                w = layer.weight
                parts.append((module.a.to(w.device, w.dtype), module.b.to(w.device, w.dtype), factor * module.scaling))
        if parts:
            layer.register_forward_hook(_lora_hook(parts))


def _lora_hook(parts: list[tuple[torch.Tensor, torch.Tensor, float]]):
    def hook(_module, inputs, output):
        x = inputs[0]  # (B, T, in)
        for a, b, scale in parts:  # a: (r, in), b: (out, r)
            output = output + scale * (x @ a.t()) @ b.t()
        return output

    return hook
