"""The model side of a training run: the base in NF4 with a fresh PEFT LoRA, its optimizer, rows as tensors and the
loss over the learned tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loramux.adapters.train_data import IGNORE_INDEX, Row
from loramux.core.adapter_config import WEIGHTS_FILE
from loramux.core.train_spec import TrainingSpec


def load_tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


def load_model(spec: TrainingSpec, base_dir: Path, device: torch.device) -> Any:
    """The base with every linear layer in NF4 (double quantization) and a fresh LoRA on the target modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if device.type == "cuda":
        # bf16 compute on the GPU. The LoRA weights themselves are fp32 everywhere (PEFT upcasts them), so small
        # updates are not lost to rounding.
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), quantization_config=quantization, dtype=torch.bfloat16, device_map={"": str(device)}
        )
    else:
        # On the CPU, in fp32, each linear layer holds dequant(NF4(W)) as a plain weight: the values bitsandbytes'
        # NF4 layer computes with, which it would dequantize again on every call of every step (a third of a step's
        # time on SmolLM2). The base is frozen, so the training is QLoRA's all the same.
        from loramux.server.layers.nf4_linear import NF4Linear

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
        head = model.get_output_embeddings()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.data = NF4Linear(module.weight.data, None, torch.float32).dequantize()
    model.config.use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if spec.gradient_checkpointing if spec.gradient_checkpointing is not None else device.type == "cuda":
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lora = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)  # the initial A matrices
    return get_peft_model(model, lora)


def make_optimizer(spec: TrainingSpec, model: Any, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        # Paged: optimizer state moves to CPU memory under pressure instead of failing with out-of-memory.
        return bnb.optim.PagedAdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def load_adapter_weights(model: Any, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(directory / WEIGHTS_FILE)))
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {directory} does not fit the model: {result.unexpected_keys[:3]}")


def collate(rows: Sequence[Row], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors. Positions restart at each packed example; padding only follows real tokens,
    so causal attention never lets a real token see it."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        positions[i, :n] = torch.tensor(row.position_ids)
        if n < width:  # padding continues the last example's positions rather than starting a new one
            positions[i, n:] = torch.arange(row.position_ids[-1] + 1, row.position_ids[-1] + 1 + width - n)
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "position_ids": positions.to(device),
        "real": torch.tensor(sum(len(r) for r in rows)),
    }


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the learned tokens.

    The output head runs only where a token is learned (`hidden` (B, T, H) -> (N, H) -> logits (N, V)), which
    spares most of the (B, T, V) logits: a large share of the compute and memory for a large vocabulary.
    """
    causal_lm = model.get_base_model()
    # With no attention mask, transformers derives one block-causal mask from the restarting position ids.
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"])[0]
    targets = batch["labels"][:, 1:]  # token t predicts token t + 1
    learned = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][learned])
    return F.cross_entropy(logits.float(), targets[learned], reduction="sum")


@torch.no_grad()
def validation_loss(model: Any, rows: Sequence[Row], batch_size: int, pad_id: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id, device)
        total += loss_sum(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total / max(1, count)
