"""`adapters train DATA.jsonl --name NS/NAME`: train a QLoRA adapter locally and push it to a hub as a new revision.

With `--out DIR` the run keeps its checkpoints and adapter in DIR, and the same command started again resumes where
it stopped (Ctrl-C stops at the next step with a checkpoint). Torch is imported only in `run()`.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from loramux.core.model_config import LINEAR_MODULES
from loramux.core.train_spec import (
    AUTO,
    AUTO_LEARNING_RATE,
    AUTO_VALIDATION_FRACTION,
    BASE_EPOCHS,
    MAX_AUTO_EPOCHS,
    REPLAY_EXAMPLES,
    SCHEDULES,
    SMALL_DATA_EXAMPLES,
    SMALL_DATA_LEARNING_RATE,
    TARGET_EXAMPLES,
    TrainingSpec,
)
from loramux.registry.cli.common import add_hub_arguments

EPILOG = (
    "auto settings follow the data set's size, as OpenAI's fine-tuning does: epochs enough that about "
    f"{TARGET_EXAMPLES} examples are seen in all ({BASE_EPOCHS} for a large data set, at most {MAX_AUTO_EPOCHS}), "
    f"learning rate {AUTO_LEARNING_RATE:g} ({SMALL_DATA_LEARNING_RATE:g} below {SMALL_DATA_EXAMPLES} examples), "
    f"{AUTO_VALIDATION_FRACTION:.0%} held out for validation from {SMALL_DATA_EXAMPLES} examples. What was chosen is "
    "printed when training starts. Against over-training (a model that has memorized a few examples answers "
    f"unrelated questions with them): below {SMALL_DATA_EXAMPLES} examples, up to {REPLAY_EXAMPLES} of the base's own "
    "answers to general prompts are trained on beside DATA (--no-replay: not); a run stops early once it reproduces "
    "every training answer (data sets of up to 256 rows), or when the validation loss has not improved for 2 epochs "
    "(keeping the best epoch's adapter); --keep-answer PROMPT also stops it (keeping the last adapter that passed) "
    "once that prompt's answer changes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # every option's default in --help
    parser.epilog = EPILOG
    parser.add_argument("data", nargs="+", help='chat-format JSONL: one {"messages": [...]} per line')
    parser.add_argument("--name", metavar="NS/NAME", help="the adapter repo to push to (needed unless --no-push)")
    parser.add_argument("--base", default=None, help="base model directory or hub id (None: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=None, help="keep checkpoints and the adapter here (resumable)")
    parser.add_argument("--no-push", action="store_true", help="train only; the adapter stays in --out")
    parser.add_argument("--private", action="store_true", help="a new repo is readable by its tenant only")
    _add_data_arguments(parser)
    _add_lora_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_check_arguments(parser)
    add_hub_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--validation-file", default=None, help="JSONL held out for the validation loss")
    data.add_argument(
        "--validation-fraction", type=_auto(float), default=AUTO, help="hold out this share of DATA instead, or auto"
    )
    data.add_argument("--max-seq-len", type=int, default=1024, help="tokens per example (longer ones are cut)")
    data.add_argument("--packing", action="store_true", help="pack several examples into each row")


def _add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank")
    lora.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling alpha/rank)")
    lora.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    lora.add_argument("--targets", default=",".join(LINEAR_MODULES), help="comma-separated modules")


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_auto(int), default=AUTO, help="passes over the data, or auto (see below)")
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    optim.add_argument(
        "--learning-rate", "--lr", type=_auto(float), default=AUTO, help="peak learning rate, or auto (see below)"
    )
    optim.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps with a rising rate")
    optim.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate decay after warm-up")
    optim.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in the backward pass: less memory, slower (None: on a GPU only)",
    )
    optim.add_argument("--seed", type=int, default=0, help="seed of the data order, dropout and LoRA init")
    optim.add_argument("--checkpoint-every", type=int, default=100, help="optimizer steps between checkpoints")
    optim.add_argument("--device", default=None, help="cuda, cuda:1, cpu (None: the GPU if there is one)")


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    checks = parser.add_argument_group("checks against over-training")
    checks.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="train every epoch, even once the training answers are reproduced or the validation loss rises",
    )
    checks.add_argument(
        "--no-replay",
        action="store_true",
        help="train on DATA alone, without the base's own answers to general prompts that a small data set is "
        "trained with (for an adapter meant to change every answer: a style, a language)",
    )
    checks.add_argument(
        "--keep-answer",
        action="append",
        default=[],
        metavar="PROMPT",
        help="a prompt whose answer must stay the base's (repeatable); the run stops once it changes",
    )


def _auto(kind: type):
    """An argparse type taking `auto` or a number."""

    def parse(text: str):
        if text == AUTO:
            return AUTO
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


# PEFT asks transformers a question that transformers has renamed: a warning for their authors, not for this command's
# user (code that calls `train` itself still sees it).
LIBRARY_NOISE = "`is_gradient_checkpointing` is deprecated"


def run(args: argparse.Namespace) -> int:
    from loramux.registry.client import hub_api, hub_token, hub_url, push
    from loramux.registry.names import check_repo_id

    warnings.filterwarnings("ignore", message=LIBRARY_NOISE, category=FutureWarning)

    if not args.no_push:
        if not args.name:
            raise ValueError("--name NS/NAME is needed to push the adapter (or give --no-push --out DIR)")
        check_repo_id(args.name)
        url, token = hub_url(args.hub), hub_token(args.token)
        hub_api(url, token)  # fails now, not after an hour of training, when the hub cannot be reached
    elif args.out is None:
        raise ValueError("--no-push needs --out DIR, or the adapter would be thrown away")
    out = args.out or Path(tempfile.mkdtemp(prefix="loramux-train-"))
    spec = TrainingSpec(
        data=list(args.data),
        output_dir=str(out),
        base=args.base,
        validation_data=args.validation_file,
        validation_fraction=args.validation_fraction,
        target_modules=[t.strip() for t in args.targets.split(",") if t.strip()],
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gradient_accumulation=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        lr_schedule=args.schedule,
        max_seq_len=args.max_seq_len,
        packing=args.packing,
        gradient_checkpointing=args.gradient_checkpointing,
        early_stopping=not args.no_early_stopping,
        replay=False if args.no_replay else AUTO,
        keep_answers=list(args.keep_answer),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    adapter = _train_with_progress(spec)
    if adapter is None:
        print(f"stopped; run the same command with --out {out} to resume", file=sys.stderr)
        return 130
    if args.no_push:
        print(f"adapter written to {adapter}")
        return 0
    message = f"Train on {', '.join(Path(p).name for p in spec.data)}"
    result = push(adapter, args.name, url, token, args.private, message)
    print(f"pushed {result.repo_id}@{result.commit} to {url}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


def _train_with_progress(spec: TrainingSpec) -> Path | None:
    """Train with a progress bar; None when stopped by Ctrl-C (a checkpoint was written)."""
    from tqdm import tqdm

    from loramux.adapters.train import TrainingEvent, TrainingStopped, train

    interrupted = False

    def on_interrupt(signum, frame) -> None:
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        interrupted = True
        tqdm.write("stopping after this step (Ctrl-C again to stop now)...", file=sys.stderr)

    bar: tqdm | None = None

    def on_event(event: TrainingEvent) -> None:
        nonlocal bar
        if event.kind == "started":
            bar = tqdm(total=event.total_steps, initial=event.step, unit="step", desc="training", file=sys.stderr)
            tqdm.write(event.message, file=sys.stderr)
        elif event.kind == "step" and bar is not None:
            bar.update(event.step - bar.n)
            bar.set_postfix(
                loss=f"{event.loss:.4f}", lr=f"{event.learning_rate:.2e}", tok_s=f"{event.tokens_per_second:.0f}"
            )
        elif event.kind in ("validation", "early_stop"):
            tqdm.write(event.message, file=sys.stderr)

    # Signal handlers can only be set from the main thread (the command is also called from tests and tools).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if main_thread else None
    try:
        return train(spec, on_event, should_stop=lambda: interrupted)
    except TrainingStopped:
        return None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
