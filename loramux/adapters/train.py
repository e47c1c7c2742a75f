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

from loramux.adapters.train_checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    write_atomically,
)
from loramux.adapters.train_checks import Checks
from loramux.adapters.train_data import IGNORE_INDEX, Row, build_rows, split_validation, tokenize_dataset
from loramux.adapters.train_model import (
    collate,
    load_adapter_weights,
    load_model,
    load_tokenizer,
    loss_sum,
    make_optimizer,
    validation_loss,
)
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
    fingerprint = spec.fingerprint()
    adapter_dir = Path(spec.output_dir) / ADAPTER_SUBDIR
    if _finished(adapter_dir, fingerprint):
        return adapter_dir  # finished before a crash that came between the end and whatever used the result
    run = _Run(spec, fingerprint, on_event or (lambda event: None))
    run.train_steps(should_stop)
    run.finish(adapter_dir)
    return adapter_dir


class _Run:
    """One run from its set-up to its adapter: the state its steps share, and the events it reports."""

    def __init__(self, spec: TrainingSpec, fingerprint: str, emit: Callable[[TrainingEvent], None]) -> None:
        """Set up: the data and the settings `auto` resolves to, the model (the last checkpoint's LoRA and optimizer
        state when resuming), the plan of steps and the checks; reports `started`."""
        self.emit, self.fingerprint = emit, fingerprint
        output_dir = Path(spec.output_dir)
        base_dir = resolve_base(spec.base)
        self.tokenizer = load_tokenizer(base_dir)
        train_rows, self.val_rows, examples = _prepare_rows(spec, self.tokenizer)
        settings = spec.describe_auto(examples)
        self.spec = spec = spec.resolved(examples)  # `auto` epochs and learning rate decided for this data set
        self.checkpoints_dir = output_dir / CHECKPOINTS_SUBDIR
        resume = _resume_point(self.checkpoints_dir, fingerprint, output_dir)
        self.device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(spec, base_dir, self.device)
        fit_rows = train_rows  # the data set's own rows: what the fit check looks at
        if replayed := spec.replayed_examples(examples):
            # The LoRA starts at zero (B = 0): the model answers as the base does. Its answers are a pure function of
            # the base, so a resumed run rebuilds the same rows.
            conversations = replay_conversations(self.model, self.tokenizer, self.device, replayed)
            replay = tokenize_dataset(self.tokenizer, conversations, spec.max_seq_len)
            train_rows = train_rows + build_rows(replay[0], spec.max_seq_len, spec.packing)
        self.train_rows = train_rows
        self.plan = _Plan(spec, len(train_rows))
        self.optimizer = make_optimizer(spec, self.model, self.device)
        self.step = 0
        if resume is not None:
            load_adapter_weights(self.model, resume.path)
            load_optimizer_state(resume, self.optimizer)
            self.step = resume.step
        tokenizer = self.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.base_name = spec.base or DEFAULT_BASE
        verb = f"resumed at step {self.step}" if self.step else "started"
        self.event(
            "started",
            f"{verb}: {len(train_rows)} training rows, {len(self.val_rows)} validation rows, {self.plan.total_steps} "
            f"steps at most; {settings}",
        )
        self.checks = Checks(
            spec, self.model, tokenizer, fit_rows, self.val_rows, self.pad_id, self.device, self.plan, self.step
        )
        self.model.train()
        self.last_checkpoint = resume.path if resume is not None else None

    def event(self, kind: str, message: str, **values: Any) -> None:
        plan = self.plan
        self.emit(TrainingEvent(kind, self.step, plan.total_steps, plan.epochs_done(self.step), message, **values))

    def train_steps(self, should_stop: Callable[[], bool] | None) -> None:
        """Optimizer steps up to the plan's last or an early stop, with validations and checkpoints between them;
        raises `TrainingStopped` (after a checkpoint) once `should_stop()` says so."""
        while self.step < self.plan.total_steps:
            if should_stop is not None and should_stop():
                if self.last_checkpoint is None or self.step != resume_step(self.last_checkpoint):
                    self.last_checkpoint = self.checkpoint()
                self.event("stopped", f"stopped at step {self.step}")
                raise TrainingStopped(self.step, self.last_checkpoint)
            self.optimizer_step()
            if self.val_rows and (self.plan.ends_epoch(self.step) or self.step == self.plan.total_steps):
                self.validate()
            reason = self.checks.after_step(self.step)
            if reason is not None:
                self.event("early_stop", reason)
                break
            every = self.spec.checkpoint_every
            if every and self.step % every == 0 and self.step < self.plan.total_steps:
                self.last_checkpoint = self.checkpoint()

    def optimizer_step(self) -> None:
        """One optimizer step over its micro-batches, reported as a `step` event."""
        spec, model, optimizer = self.spec, self.model, self.optimizer
        started = time.perf_counter()
        lr = spec.learning_rate * self.plan.lr_factor(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout draws from a generator seeded by the step, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(spec.seed * 1_000_003 + self.step)
        batches = [collate(rows, self.pad_id, self.device) for rows in self.plan.batches_of(self.step, self.train_rows)]
        learned = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total_loss = 0.0
        for batch in batches:
            # Sum over this micro-batch, divided by the learned tokens of the whole step: every token weighs the
            # same however the step is split into micro-batches.
            loss = loss_sum(model, batch) / learned
            loss.backward()
            total_loss += loss.item()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int(b["real"]) for b in batches)
        elapsed = time.perf_counter() - started
        self.event(
            "step",
            f"step {self.step}/{self.plan.total_steps}: loss {total_loss:.4f}",
            loss=total_loss,
            learning_rate=lr,
            tokens_per_second=tokens / elapsed if elapsed > 0 else None,
            tokens=tokens,
        )

    def validate(self) -> None:
        val_loss = validation_loss(self.model, self.val_rows, self.spec.batch_size, self.pad_id, self.device)
        self.event("validation", f"step {self.step}: validation loss {val_loss:.4f}", val_loss=val_loss)
        self.checks.validated(self.step, val_loss)

    def save_adapter(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory), safe_serialization=True)
        _name_base(directory, self.base_name)

    def checkpoint(self) -> Path:
        state = {"fingerprint": self.fingerprint}
        path = save_checkpoint(self.checkpoints_dir, self.step, self.save_adapter, self.optimizer, state)
        self.event("checkpoint", f"checkpoint at step {self.step}")
        return path

    def finish(self, adapter_dir: Path) -> None:
        """Write the adapter the run ends with (the one a check kept, else the last) and drop the checkpoints."""
        kept = self.checks.finish(self.step)
        if kept is not None:
            self.event("early_stop", kept)

        def fill(directory: Path) -> None:
            self.save_adapter(directory)
            (directory / "README.md").unlink(missing_ok=True)  # PEFT's model-card template says nothing true here
            (directory / _DONE_FILE).write_text(json.dumps({"fingerprint": self.fingerprint, "steps": self.step}))

        write_atomically(adapter_dir, fill)
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)  # the adapter supersedes them
        self.event("finished", f"adapter written to {adapter_dir}")


def _resume_point(checkpoints_dir: Path, fingerprint: str, output_dir: Path) -> Checkpoint | None:
    """The last checkpoint to resume from, if any; refuses checkpoints another run (other settings or data) left."""
    resume = latest_checkpoint(checkpoints_dir)
    if resume is not None and resume.state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{output_dir} holds checkpoints of another run (different settings or data); "
            "use another output directory or delete its checkpoints"
        )
    return resume


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


def _name_base(directory: Path, base_name: str) -> None:
    # PEFT records the local path it loaded from; the adapter should name the base as users know it.
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
