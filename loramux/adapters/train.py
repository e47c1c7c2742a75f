"""The trainer: QLoRA on an NF4 base (double quantization, bitsandbytes) with a PEFT LoRA.

`train(spec, on_event, should_stop)` is what both `adapters train` and the training worker call. It reports
progress through `on_event`, checks `should_stop()` before every optimizer step, checkpoints into
`spec.output_dir`, resumes from the last checkpoint when started again on the same directory, and returns the
adapter directory (`adapter_config.json` + `adapter_model.safetensors`), which `load_lora` reads and the serving
engine serves.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loramux.adapters.train_checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    write_atomically,
)
from loramux.adapters.train_data import IGNORE_INDEX, Row, build_rows, split_validation, tokenize_dataset
from loramux.adapters.train_replay import replay_conversations
from loramux.core.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loramux.core.chat_data import DataError, load_chat_jsonl
from loramux.core.train_spec import TrainingSpec
from loramux.server.models.checkpoint import DEFAULT_BASE, resolve_base

log = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"
CHECKPOINTS_SUBDIR = "checkpoints"
_DONE_FILE = ".training_done.json"  # hidden: `adapters push` skips it


@dataclass
class TrainingEvent:
    """One progress report. `kind`: started, step, validation, checkpoint, stopped or finished."""

    kind: str
    step: int
    total_steps: int
    epoch: float  # epochs completed, fractional
    message: str
    loss: float | None = None  # mean loss per learned token of this step
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens: int | None = None  # tokens in this step's rows, padding excluded
    val_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class TrainingStopped(Exception):
    """`should_stop()` asked the run to end; a checkpoint of the last finished step was written."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"training stopped at step {step}")
        self.step = step
        self.checkpoint = checkpoint


def train(
    spec: TrainingSpec,
    on_event: Callable[[TrainingEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Run (or resume) `spec`; returns `spec.output_dir/adapter`. Raises `TrainingStopped` when stopped,
    `DataError`/`TrainingSpecError` (ValueErrors) for bad input before any model is loaded."""
    emit = on_event or (lambda event: None)
    output_dir = Path(spec.output_dir)
    fingerprint = spec.fingerprint()
    adapter_dir = output_dir / ADAPTER_SUBDIR
    if _finished(adapter_dir, fingerprint):
        return adapter_dir  # finished before a crash that came between the end and whatever used the result

    base_dir = resolve_base(spec.base)
    tokenizer = _load_tokenizer(base_dir)
    train_rows, val_rows, examples = _prepare_rows(spec, tokenizer)
    settings = spec.describe_auto(examples)
    spec = spec.resolved(examples)  # `auto` epochs and learning rate decided for this data set

    checkpoints_dir = output_dir / CHECKPOINTS_SUBDIR
    resume = latest_checkpoint(checkpoints_dir)
    if resume is not None and resume.state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{output_dir} holds checkpoints of another run (different settings or data); "
            "use another output directory or delete its checkpoints"
        )

    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load_model(spec, base_dir, device)
    fit_rows = train_rows  # the data set's own rows: what the fit check looks at
    if replayed := spec.replayed_examples(examples):
        # The LoRA starts at zero (B = 0): the model answers as the base does. Its answers are a pure function of the
        # base, so a resumed run rebuilds the same rows.
        replay = tokenize_dataset(tokenizer, replay_conversations(model, tokenizer, device, replayed), spec.max_seq_len)
        train_rows = train_rows + build_rows(replay[0], spec.max_seq_len, spec.packing)
    plan = _Plan(spec, len(train_rows))
    optimizer = _make_optimizer(spec, model, device)
    step = 0
    if resume is not None:
        _load_adapter_weights(model, resume.path)
        load_optimizer_state(resume, optimizer)
        step = resume.step
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base_name = spec.base or DEFAULT_BASE

    def save_adapter(directory: Path) -> None:
        model.save_pretrained(str(directory), safe_serialization=True)
        _name_base(directory, base_name)

    def checkpoint() -> Path:
        path = save_checkpoint(checkpoints_dir, step, save_adapter, optimizer, {"fingerprint": fingerprint})
        emit(TrainingEvent("checkpoint", step, plan.total_steps, plan.epochs_done(step), f"checkpoint at step {step}"))
        return path

    verb = f"resumed at step {step}" if step else "started"
    emit(
        TrainingEvent(
            "started",
            step,
            plan.total_steps,
            plan.epochs_done(step),
            f"{verb}: {len(train_rows)} training rows, {len(val_rows)} validation rows, {plan.total_steps} steps at "
            f"most; {settings}",
        )
    )
    checks = _Checks(spec, model, tokenizer, fit_rows, val_rows, pad_id, device, plan, step)
    model.train()
    last_checkpoint = resume.path if resume is not None else None
    while step < plan.total_steps:
        if should_stop is not None and should_stop():
            if last_checkpoint is None or step != resume_step(last_checkpoint):
                last_checkpoint = checkpoint()
            emit(TrainingEvent("stopped", step, plan.total_steps, plan.epochs_done(step), f"stopped at step {step}"))
            raise TrainingStopped(step, last_checkpoint)
        started = time.perf_counter()
        lr = spec.learning_rate * plan.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout draws from a generator seeded by the step, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(spec.seed * 1_000_003 + step)
        batches = [_collate(rows, pad_id, device) for rows in plan.batches_of(step, train_rows)]
        learned = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total_loss = 0.0
        for batch in batches:
            # Sum over this micro-batch, divided by the learned tokens of the whole step: every token weighs the
            # same however the step is split into micro-batches.
            loss = _loss_sum(model, batch) / learned
            loss.backward()
            total_loss += loss.item()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens = sum(int(b["real"]) for b in batches)
        elapsed = time.perf_counter() - started
        emit(
            TrainingEvent(
                "step",
                step,
                plan.total_steps,
                plan.epochs_done(step),
                f"step {step}/{plan.total_steps}: loss {total_loss:.4f}",
                loss=total_loss,
                learning_rate=lr,
                tokens_per_second=tokens / elapsed if elapsed > 0 else None,
                tokens=tokens,
            )
        )
        if val_rows and (plan.ends_epoch(step) or step == plan.total_steps):
            val_loss = _validation_loss(model, val_rows, spec.batch_size, pad_id, device)
            emit(
                TrainingEvent(
                    "validation",
                    step,
                    plan.total_steps,
                    plan.epochs_done(step),
                    f"step {step}: validation loss {val_loss:.4f}",
                    val_loss=val_loss,
                )
            )
            checks.validated(step, val_loss)
        reason = checks.after_step(step)
        if reason is not None:
            emit(TrainingEvent("early_stop", step, plan.total_steps, plan.epochs_done(step), reason))
            break
        if spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < plan.total_steps:
            last_checkpoint = checkpoint()
    kept = checks.finish(step)
    if kept is not None:
        emit(TrainingEvent("early_stop", step, plan.total_steps, plan.epochs_done(step), kept))

    def fill(directory: Path) -> None:
        save_adapter(directory)
        (directory / "README.md").unlink(missing_ok=True)  # PEFT's model-card template says nothing true here
        (directory / _DONE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "steps": step}))

    write_atomically(adapter_dir, fill)
    shutil.rmtree(checkpoints_dir, ignore_errors=True)  # the adapter supersedes them
    emit(TrainingEvent("finished", step, plan.total_steps, plan.epochs_done(step), f"adapter written to {adapter_dir}"))
    return adapter_dir


def _finished(adapter_dir: Path, fingerprint: str) -> bool:
    try:
        done = json.loads((adapter_dir / _DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return done.get("fingerprint") == fingerprint and (adapter_dir / WEIGHTS_FILE).is_file()


def resume_step(checkpoint_dir: Path) -> int:
    return int(checkpoint_dir.name.rsplit("-", 1)[1])


class _Plan:
    """Which rows each optimizer step trains on, and the learning rate at each step.

    Each epoch shuffles the rows with a generator seeded by (seed, epoch), cuts them into micro-batches of
    `batch_size` rows and groups `gradient_accumulation` micro-batches per step (the last step of an epoch may
    get fewer). A step's rows are a pure function of its number, which is what makes resuming exact.
    """

    def __init__(self, spec: TrainingSpec, n_rows: int) -> None:
        self.spec = spec
        self.n_rows = n_rows
        self.micro_per_epoch = math.ceil(n_rows / spec.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / spec.gradient_accumulation)
        total = self.steps_per_epoch * spec.epochs
        self.total_steps = min(total, spec.max_steps) if spec.max_steps else total
        self.warmup_steps = round(spec.warmup_ratio * self.total_steps)

    def batches_of(self, step: int, rows: Sequence[Row]) -> list[list[Row]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = list(range(self.n_rows))
        random.Random(self.spec.seed * 1_000_003 + epoch).shuffle(order)
        size, accumulation = self.spec.batch_size, self.spec.gradient_accumulation
        first = index * accumulation
        micro = range(first, min(first + accumulation, self.micro_per_epoch))
        return [[rows[i] for i in order[m * size : (m + 1) * size]] for m in micro]

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def epochs_done(self, step: int) -> float:
        return round(step / self.steps_per_epoch, 4)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then constant, linear or cosine decay towards 0 at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.spec.lr_schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.spec.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# Early stopping on fit is for small data sets (a check reads every training row): up to this many rows.
FIT_CHECK_MAX_ROWS = 256
VALIDATION_PATIENCE = 2  # validations in a row without a new best loss before a run stops
KEEP_ANSWER_TOKENS = 32  # how much of each `keep_answers` answer is compared


class _Checks:
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
            self.passed = (step, _lora_state(model))

    def validated(self, step: int, loss: float) -> None:
        if not self.patience:
            return
        if loss < self.best_loss:
            self.best_loss, self.bad_validations = loss, 0
            self.best = (step, _lora_state(self.model))
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
            self.passed = (step, _lora_state(self.model))
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


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def _answers_reproduced(model: Any, rows: Sequence[Row], batch_size: int, pad_id: int, device: torch.device) -> int:
    """How many rows' learned tokens are all the model's most likely next tokens (teacher-forced)."""
    model.eval()
    reproduced = 0
    causal_lm = model.get_base_model()
    for start in range(0, len(rows), batch_size):
        batch = _collate(rows[start : start + batch_size], pad_id, device)
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


def _load_tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


def _prepare_rows(spec: TrainingSpec, tokenizer: Any) -> tuple[list[Row], list[Row], int]:
    """(training rows, validation rows, training examples)."""
    conversations = [c for path in spec.data for c in load_chat_jsonl(path)]
    if spec.validation_data:
        validation = load_chat_jsonl(spec.validation_data)
    else:
        share = spec.validation_share(len(conversations))
        conversations, validation = split_validation(conversations, share, spec.seed)
    examples, dropped = tokenize_dataset(tokenizer, conversations, spec.max_seq_len)
    if not examples:
        raise DataError(f"every example's assistant turns lie beyond max_seq_len={spec.max_seq_len} tokens")
    if dropped:
        log.warning("%d examples dropped: their assistant turns lie beyond max_seq_len=%d", dropped, spec.max_seq_len)
    val_examples, _ = tokenize_dataset(tokenizer, validation, spec.max_seq_len)
    return (
        build_rows(examples, spec.max_seq_len, spec.packing),
        build_rows(val_examples, spec.max_seq_len, spec.packing),
        len(examples),
    )


def _load_model(spec: TrainingSpec, base_dir: Path, device: torch.device) -> Any:
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


def _make_optimizer(spec: TrainingSpec, model: Any, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        # Paged: optimizer state moves to CPU memory under pressure instead of failing with out-of-memory.
        return bnb.optim.PagedAdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def _load_adapter_weights(model: Any, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(directory / WEIGHTS_FILE)))
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {directory} does not fit the model: {result.unexpected_keys[:3]}")


def _name_base(directory: Path, base_name: str) -> None:
    # PEFT records the local path it loaded from; the adapter should name the base as users know it.
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _collate(rows: Sequence[Row], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
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


def _loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
def _validation_loss(model: Any, rows: Sequence[Row], batch_size: int, pad_id: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = _collate(rows[start : start + batch_size], pad_id, device)
        total += _loss_sum(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total / max(1, count)
