"""Loading a base model: resolve it, read config and weights, quantize the decoder linears to NF4 (or keep them in
the compute dtype: a merged checkpoint by default), place it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.core.model_config import ModelConfig
from loramux.server.models.checkpoint import (
    load_config,
    load_generation_defaults,
    load_state_dict,
    quantize_for,
    resolve_base,
)
from loramux.server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    name: str
    path: Path
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: object  # a transformers tokenizer; typed loosely so this module does not import transformers eagerly
    # generation_config.json's sampling settings (temperature, top_p, top_k, min_p, repetition_penalty,
    # max_new_tokens): the defaults of a request that gives none of its own
    generation_defaults: dict[str, float | int] = field(default_factory=dict)
    quantize: str = "nf4"  # how the decoder linear layers hold their weights: "nf4" or "none" (the compute dtype)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head_weight.device

    def stop_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered with the base's chat template, ready for the assistant's turn."""
        return chat_prompt_ids(self.tokenizer, messages)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with `tokenizer`'s chat template, ready for the assistant's turn; raises
    ValueError where the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this base model has no chat template; use a plain prompt")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype_for(device: torch.device) -> torch.dtype:
    # bf16 on the GPU; on the CPU fp32 is both faster and exact enough for parity tests.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base(
    name_or_path: str | None = None, device: str | torch.device | None = None, quantize: str = "auto"
) -> BaseModel:
    """Load a Llama-family base. quantize: "nf4" (every decoder linear layer in NF4 with double quantization), "none"
    (kept in the compute dtype), or "auto": none for a checkpoint `adapters merge` wrote, nf4 otherwise."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    path = resolve_base(name_or_path)
    config = load_config(path)
    quantize = quantize_for(path, quantize)
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype_for(device)
    # Quantize on the target device: bitsandbytes' GPU quantizer is much faster, and the fp32 copy of a layer
    # lives only until its NF4 copy exists.
    state = {k: v.to(device) for k, v in load_state_dict(path).items()}
    model = LlamaForCausalLM(config, state, dtype, quantize).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    weights = "NF4" if quantize == "nf4" else str(dtype).removeprefix("torch.")
    log.info(
        "loaded base %s (%s, decoder weights in %s) on %s in %.1fs",
        path.name, config.architecture, weights, device, time.perf_counter() - started,
    )  # fmt: skip
    name = name_or_path or path.name
    return BaseModel(
        name=name,
        path=path,
        config=config,
        model=model,
        tokenizer=tokenizer,
        quantize=quantize,
        generation_defaults=load_generation_defaults(path),
    )
