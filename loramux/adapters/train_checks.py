"""The checks against over-training that a training run makes between its steps; each may end the run early."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from loramux.adapters.train_data import IGNORE_INDEX, Row
from loramux.adapters.train_model import collate

# Early stopping on fit is for small data sets (a check reads every training row): up to this many rows.
FIT_CHECK_MAX_ROWS = 256
VALIDATION_PATIENCE = 2  # validations in a row without a new best loss before a run stops
KEEP_ANSWER_TOKENS = 32  # how much of each `keep_answers` answer is compared


class Checks:
    """The held-back checks against over-training, run between steps; each may end the run early.

    - Fit (with `early_stopping`, data sets of up to FIT_CHECK_MAX_ROWS rows): every quarter epoch, whether the model
      now reproduces every training answer (each assistant token is its most likely next token, so greedy decoding
      gives the answer back). Once it does, more epochs only over-train: a model that has memorized a small data set
      starts answering unrelated questions with it. The run stops there.
    - Validation loss (with `early_stopping` and validation rows): after VALIDATION_PATIENCE epochs in a row without
      a new best, the run stops and keeps the adapter of the best one.
    - `keep_answers`: at the same points as the fit check, each prompt's greedy answer against the base's; once one
      changes, the run stops and keeps the adapter of the last check where none had.
    A run that goes through every epoch with validation rows ends with the best validation's adapter.

    The adapters kept are held in memory: a run resumed from a checkpoint compares from the step it resumed at.
    """

    def __init__(self, spec, model, tokenizer, rows, val_rows, pad_id, device, plan, step) -> None:
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.rows, self.pad_id, self.device = rows, pad_id, device
        self.fit = spec.early_stopping and len(rows) <= FIT_CHECK_MAX_ROWS
        self.patience = spec.early_stopping and bool(val_rows)
        # Four checks an epoch (every step of a small one): a small data set goes from not yet learned to memorized
        # within a few steps.
        self.every = max(1, plan.steps_per_epoch // 4)
        self.best_loss, self.bad_validations = math.inf, 0
        self.best: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, LoRA weights) of the best validation
        self.passed: tuple[int, dict[str, torch.Tensor]] | None = None  # of the last check the kept answers passed
        self.restore: tuple[int, dict[str, torch.Tensor]] | None = None  # what the run ends with, if not the last
        self.base_answers: dict[str, str] = {}
        if spec.keep_answers:
            with model.disable_adapter():
                self.base_answers = {p: _greedy_answer(model, tokenizer, p, device) for p in spec.keep_answers}
            self.passed = (step, lora_state(model))

    def validated(self, step: int, loss: float) -> None:
        if not self.patience:
            return
        if loss < self.best_loss:
            self.best_loss, self.bad_validations = loss, 0
            self.best = (step, lora_state(self.model))
        else:
            self.bad_validations += 1

    def after_step(self, step: int) -> str | None:
        """Why the run stops after `step`, or None."""
        if self.patience and self.bad_validations >= VALIDATION_PATIENCE:
            self.restore = self.best
            return (
                f"step {step}: the validation loss has not improved for {VALIDATION_PATIENCE} epochs (best "
                f"{self.best_loss:.4f} at step {self.best[0]}); stopping with the adapter of step {self.best[0]}"
            )
        if step % self.every:
            return None
        for prompt, expected in self.base_answers.items():
            answer = _greedy_answer(self.model, self.tokenizer, prompt, self.device)
            if answer != expected:
                self.restore = self.passed
                return (
                    f"step {step}: the answer to {prompt!r} changed ({expected!r} -> {answer!r}); stopping with the "
                    f"adapter of step {self.passed[0]}"
                )
        if self.base_answers:
            self.passed = (step, lora_state(self.model))
        if self.fit:
            reproduced = _answers_reproduced(self.model, self.rows, self.spec.batch_size, self.pad_id, self.device)
            if reproduced == len(self.rows):
                return f"step {step}: every training answer is reproduced; stopping before it over-trains"
        return None

    def finish(self, step: int) -> str | None:
        """Put back the adapter the run ends with, if not the one of `step` (the last): what was kept by the check
        that stopped the run, or after every epoch, the best validation's. Returns what was done, or None."""
        from peft import set_peft_model_state_dict

        kept = self.restore
        if kept is None and self.patience and self.best is not None and self.best[0] != step:
            kept = self.best
            message = f"the validation loss was best at step {kept[0]} ({self.best_loss:.4f}): keeping that adapter"
        else:
            message = None
        if kept is None or kept[0] == step:
            return None
        set_peft_model_state_dict(self.model, kept[1])
        return message


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def _answers_reproduced(model: Any, rows: Sequence[Row], batch_size: int, pad_id: int, device: torch.device) -> int:
    """How many rows' learned tokens are all the model's most likely next tokens (teacher-forced)."""
    model.eval()
    reproduced = 0
    causal_lm = model.get_base_model()
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id, device)
        hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"])[0]
        targets = batch["labels"][:, 1:]  # (B, T-1)
        learned = targets != IGNORE_INDEX
        predicted = torch.zeros_like(targets)
        predicted[learned] = causal_lm.get_output_embeddings()(hidden[:, :-1][learned]).argmax(-1)
        reproduced += int(((predicted == targets) | ~learned).all(dim=1).sum())
    model.train()
    return reproduced


@torch.no_grad()
def _greedy_answer(model: Any, tokenizer: Any, prompt: str, device: torch.device) -> str:
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    output = model.generate(input_ids=ids, max_new_tokens=KEEP_ANSWER_TOKENS, do_sample=False, use_cache=True)
    model.train()
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
