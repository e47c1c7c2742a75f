"""What a training run is asked to do: one dataclass, checked up front, shared by the CLI and the training worker.
Imports no torch."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from loramux.core.adapter_config import MAX_RANK
from loramux.core.model_config import LINEAR_MODULES

SCHEDULES = ("cosine", "linear", "constant")
AUTO = "auto"

# `auto` settings, chosen from the number of training examples as OpenAI's fine-tuning API chooses n_epochs: enough
# epochs that about TARGET_EXAMPLES examples are seen in all (the 3 epochs of a large data set, up to MAX_AUTO_EPOCHS
# for a small one), and fewer for a data set so large that 3 epochs would pass MAX_TARGET_EXAMPLES. A run stops early
# once it reproduces every training answer (see `early_stopping`), so the epochs are an upper bound.
BASE_EPOCHS = 3
TARGET_EXAMPLES = 160
MAX_AUTO_EPOCHS = 25
MAX_TARGET_EXAMPLES = 25_000
AUTO_LEARNING_RATE = 2e-4
SMALL_DATA_EXAMPLES = 100  # below this, no validation split (too few to hold any out) and the learning rate below
SMALL_DATA_LEARNING_RATE = 3e-4
AUTO_VALIDATION_FRACTION = 0.1
REPLAY_EXAMPLES = 24  # the base's own answers to general prompts trained on beside a small data set (train_replay)

# Settings that do not change what is learned; a run may be resumed with other values for them.
_NOT_IN_FINGERPRINT = {"output_dir", "checkpoint_every", "device"}


class TrainingSpecError(ValueError):
    """A training setting is missing, of the wrong type or out of range."""


@dataclass
class TrainingSpec:
    """One QLoRA run: the base (None = the default model), the data, the LoRA and the optimisation.

    Steps are optimizer steps (each `batch_size * gradient_accumulation` rows). `validation_fraction` holds out
    part of `data` when no `validation_data` is given. `output_dir` holds the checkpoints and, at the end, the
    adapter in `output_dir/adapter`; a run started again on the same directory resumes from its last checkpoint.
    """

    data: list[str]
    output_dir: str
    base: str | None = None
    validation_data: str | None = None
    validation_fraction: float | str = AUTO
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES))
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    use_rslora: bool = False
    epochs: int | str = AUTO
    max_steps: int | None = None  # stop after this many optimizer steps even if epochs remain
    learning_rate: float | str = AUTO
    batch_size: int = 4
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 1024
    packing: bool = False
    gradient_checkpointing: bool | None = None  # None: on a GPU, where it saves memory; off on the CPU (faster)
    seed: int = 0
    early_stopping: bool = True  # stop once every training answer is reproduced, or validation loss stops falling
    replay: bool | str = AUTO  # train on the base's own answers to general prompts too; auto: for a small data set
    keep_answers: list[str] = field(default_factory=list)  # prompts whose (greedy) answers must not change
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only when stopped
    device: str | None = None  # None = the GPU if there is one

    def __post_init__(self) -> None:
        # Paths are kept as strings so that the spec round-trips through JSON (job records, checkpoints).
        if isinstance(self.data, (str, Path)):
            self.data = [self.data]
        if isinstance(self.data, list):
            self.data = [str(p) if isinstance(p, Path) else p for p in self.data]
        for name in ("output_dir", "validation_data"):
            if isinstance(getattr(self, name), Path):
                setattr(self, name, str(getattr(self, name)))
        if not isinstance(self.data, list) or not self.data or not all(isinstance(p, str) and p for p in self.data):
            raise TrainingSpecError("data must name at least one JSONL file")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise TrainingSpecError("output_dir must be a directory path")
        _expect("base", self.base, str, optional=True)
        _expect("validation_data", self.validation_data, str, optional=True)
        _expect("device", self.device, str, optional=True)
        if self.validation_fraction != AUTO:
            _number("validation_fraction", self.validation_fraction, 0.0, 0.5)
            if self.validation_data and self.validation_fraction:
                raise TrainingSpecError("give either validation_data or validation_fraction, not both")
        if (
            not isinstance(self.target_modules, list)
            or not self.target_modules
            or any(t not in LINEAR_MODULES for t in self.target_modules)
        ):
            raise TrainingSpecError(
                f"target_modules must be a non-empty list of {', '.join(LINEAR_MODULES)}; got {self.target_modules!r}"
            )
        self.target_modules = sorted(set(self.target_modules), key=LINEAR_MODULES.index)
        _integer("r", self.r, 1, MAX_RANK)
        _number("lora_alpha", self.lora_alpha, 1e-6, 1e6)
        _number("lora_dropout", self.lora_dropout, 0.0, 0.9)
        _expect("use_rslora", self.use_rslora, bool)
        if self.epochs != AUTO:
            _integer("epochs", self.epochs, 1, 1000)
        if self.max_steps is not None:
            _integer("max_steps", self.max_steps, 1, 10**9)
        if self.learning_rate != AUTO:
            _number("learning_rate", self.learning_rate, 1e-9, 1.0)
        _integer("batch_size", self.batch_size, 1, 4096)
        _integer("gradient_accumulation", self.gradient_accumulation, 1, 4096)
        _number("warmup_ratio", self.warmup_ratio, 0.0, 0.5)
        if self.lr_schedule not in SCHEDULES:
            raise TrainingSpecError(f"lr_schedule must be one of {', '.join(SCHEDULES)}; got {self.lr_schedule!r}")
        _number("weight_decay", self.weight_decay, 0.0, 1.0)
        _number("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _integer("max_seq_len", self.max_seq_len, 16, 1 << 20)
        _expect("packing", self.packing, bool)
        _expect("gradient_checkpointing", self.gradient_checkpointing, bool, optional=True)
        _integer("seed", self.seed, 0, 2**31 - 1)
        _integer("checkpoint_every", self.checkpoint_every, 0, 10**9)
        _expect("early_stopping", self.early_stopping, bool)
        if self.replay != AUTO:
            _expect("replay", self.replay, bool)
        if not isinstance(self.keep_answers, list) or not all(isinstance(p, str) and p for p in self.keep_answers):
            raise TrainingSpecError(f"keep_answers must be a list of prompts; got {self.keep_answers!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingSpec:
        """Build from JSON-like settings; unknown keys are refused by name (a typo must not silently do nothing)."""
        if not isinstance(raw, dict):
            raise TrainingSpecError("training settings must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainingSpecError(f"unknown training settings: {', '.join(unknown)}")
        missing = [name for name in ("data", "output_dir") if name not in raw]
        if missing:
            raise TrainingSpecError(f"missing training settings: {', '.join(missing)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A hash of everything that decides what is learned: the settings and the data files' bytes."""
        digest = hashlib.sha256()
        settings = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for path in [*self.data, *([self.validation_data] if self.validation_data else [])]:
            try:
                digest.update(Path(path).read_bytes())
            except OSError as exc:
                raise TrainingSpecError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return digest.hexdigest()

    def validation_share(self, examples: int) -> float:
        """The share of `examples` held out for validation: the setting, or with `auto` 10% of a data set of 100
        examples or more that has no `validation_data` (below that, too few to hold any out)."""
        if self.validation_fraction != AUTO:
            return float(self.validation_fraction)
        return AUTO_VALIDATION_FRACTION if not self.validation_data and examples >= SMALL_DATA_EXAMPLES else 0.0

    def resolved(self, examples: int) -> TrainingSpec:
        """This spec with `auto` epochs and learning rate decided for `examples` training examples (see
        `auto_epochs`, `auto_learning_rate`)."""
        return replace(
            self,
            epochs=auto_epochs(examples) if self.epochs == AUTO else self.epochs,
            learning_rate=auto_learning_rate(examples) if self.learning_rate == AUTO else self.learning_rate,
            validation_fraction=self.validation_share(examples),
        )

    def replayed_examples(self, examples: int) -> int:
        """How many of the base's own answers to general prompts are trained on beside `examples` examples
        (`train_replay`): with `replay` auto, as many as the examples (at most REPLAY_EXAMPLES) below
        SMALL_DATA_EXAMPLES, else none."""
        if self.replay is False or (self.replay == AUTO and examples >= SMALL_DATA_EXAMPLES):
            return 0
        return min(REPLAY_EXAMPLES, examples) if self.replay == AUTO else REPLAY_EXAMPLES

    def describe_auto(self, examples: int) -> str:
        """What `auto` chose, for the run's first event: 'epochs 9 (auto, 18 examples), learning rate 3e-04 (auto)'."""
        resolved = self.resolved(examples)
        parts = [
            f"epochs {resolved.epochs}" + (f" (auto for {examples} examples)" if self.epochs == AUTO else ""),
            f"learning rate {resolved.learning_rate:.0e}" + (" (auto)" if self.learning_rate == AUTO else ""),
        ]
        if replayed := self.replayed_examples(examples):
            parts.append(f"{replayed} of the base's own answers replayed" + (" (auto)" if self.replay == AUTO else ""))
        return ", ".join(parts)


def auto_epochs(examples: int) -> int:
    """Epochs for `examples` training examples: 3, more for a small data set (about TARGET_EXAMPLES seen in all, at
    most MAX_AUTO_EPOCHS), fewer for a very large one (about MAX_TARGET_EXAMPLES seen, at least 1)."""
    examples = max(1, examples)
    if examples * BASE_EPOCHS < TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(TARGET_EXAMPLES / examples))
    if examples * BASE_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // examples)
    return BASE_EPOCHS


def auto_learning_rate(examples: int) -> float:
    """The learning rate for `examples` training examples: QLoRA's 2e-4, a little higher for a small data set."""
    return SMALL_DATA_LEARNING_RATE if examples < SMALL_DATA_EXAMPLES else AUTO_LEARNING_RATE


def _expect(name: str, value: Any, kind: type, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, kind):
        raise TrainingSpecError(f"{name} must be a {kind.__name__}; got {value!r}")


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TrainingSpecError(f"{name} must be an integer from {low} to {high}; got {value!r}")


def _number(name: str, value: Any, low: float, high: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise TrainingSpecError(f"{name} must be a number from {low:g} to {high:g}; got {value!r}")
