"""Training benchmark: loramux's QLoRA trainer beside plain transformers + PEFT + bitsandbytes, same run.

    python loadtests/bench_train.py --json train.json     # on the GPU: the Llama-3-8B shape in NF4
    python loadtests/bench_train.py --tiny                # the same flow on a tiny model, on the CPU (for CI)

The base is a Llama-3-8B-shaped checkpoint (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab
128256, bf16) with random weights, written shard by shard (one decoder layer per safetensors file, generated on the
GPU) so that at most one layer sits in CPU memory; with `--workdir` it is kept there and reused by later runs. The
data is one chat conversation repeated, cut to exactly `--seq-len` tokens by a byte-level tokenizer: content does
not change the compute, and identical rows let the two runs' first losses be compared (LoRA's B starts at zero, so
step 1 is the base's own loss in both).

Both runs: NF4 with double quantization, LoRA r=16, alpha 32, dropout 0.05 on all 7 linear modules, gradient
checkpointing, bf16 compute, paged AdamW (bitsandbytes) at lr 2e-4, gradient clipping at 1.0, `--batch-size` rows per
step. loramux runs `loramux.adapters.train.train`; the baseline is the usual recipe: `from_pretrained` with a
`BitsAndBytesConfig`, `prepare_model_for_kbit_training` (which upcasts the norms, embeddings and output head to fp32),
`get_peft_model` and a plain loop over the model's standard forward (logits at every position, cross-entropy on the
same learned tokens) under bf16 autocast, as the Trainer's `bf16=True` runs it: without autocast, the upcast norms
would carry fp32 activations into every layer. `--tiny` uses fp32 and torch's AdamW, as the trainer does on the
CPU.

Tokens/s counts every token of the measured steps (after `--warmup` steps) over their wall-clock time, the device
synchronised at each step's end. Peak memory is `torch.cuda.max_memory_allocated`, reset before each run: once for
loading (model and LoRA), then for training (which includes the resident model). The paged optimizer's state lives in
CUDA unified memory, outside torch's allocator, so it is not in these figures (about 0.3 GiB for this LoRA, the same
in both runs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; nothing may be downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loadtests import shapes
from loadtests.record import commit, dated_json_path, help_text
from loadtests.shapes import with_rope_parameters
from loadtests.tiny_model import write_tiny_tokenizer
from loramux.adapters.train import TrainingEvent, train
from loramux.adapters.train_data import IGNORE_INDEX, Row, build_rows, tokenize_dataset
from loramux.core.chat_data import load_chat_jsonl
from loramux.core.model_config import LINEAR_MODULES
from loramux.core.train_spec import TrainingSpec

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258  # write_tiny_tokenizer's specials, after the 256 bytes

LLAMA3_8B = with_rope_parameters(shapes.LLAMA3_8B)
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

RANK, ALPHA, DROPOUT, LEARNING_RATE, MAX_GRAD_NORM, SEED = 16, 32, 0.05, 2e-4, 1.0, 0
BASELINE = "transformers+peft+bnb"
MARKER = "bench_checkpoint.json"  # written last: a directory holding it is a complete checkpoint
GIB = 2**30


@dataclass
class RunResult:
    impl: str
    load_s: float  # from nothing to a model with its LoRA and optimizer, ready to train
    warmup_s: float
    measured_steps: int
    tokens: int  # tokens in the measured steps
    seconds: float  # wall-clock time of the measured steps
    tokens_per_s: float
    step_ms_median: float
    losses: list[float] = field(default_factory=list)  # every step's loss, warm-up included
    allocated_before_gib: float | None = None  # left over from earlier phases when the run started
    peak_load_gib: float | None = None
    peak_train_gib: float | None = None
    peak_reserved_gib: float | None = None


class StepClock:
    """Times steps: `tick(tokens, loss)` at the end of each step, after synchronising the device."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.started = time.perf_counter()
        self.ready: float | None = None  # when the model, LoRA and optimizer were ready
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def mark_ready(self) -> None:
        self.ready = time.perf_counter()

    def tick(self, tokens: int, loss: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.tokens.append(tokens)
        self.losses.append(loss)

    def result(self, impl: str) -> RunResult:
        if self.ready is None or len(self.ends) <= self.warmup:
            raise RuntimeError(f"{impl}: {len(self.ends)} steps ran; the benchmark needs more than --warmup")
        first = self.ends[self.warmup - 1] if self.warmup else self.ready
        seconds = self.ends[-1] - first
        steps = [b - a for a, b in itertools.pairwise([first, *self.ends[self.warmup :]])]
        tokens = sum(self.tokens[self.warmup :])
        return RunResult(
            impl=impl,
            load_s=self.ready - self.started,
            warmup_s=first - self.ready,
            measured_steps=len(self.ends) - self.warmup,
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds,
            step_ms_median=1000 * statistics.median(steps),
            losses=self.losses,
        )


# --- the base checkpoint and the data ---------------------------------------------------------------------------


def llama_config(shape: dict[str, Any], dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **shape,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype=dtype,
    )


def shard_of(name: str, n_layers: int) -> int:
    """Shard 0: the embeddings; shard 1 + i: decoder layer i; the last: the final norm and the output head."""
    if name.startswith("model.layers."):
        return 1 + int(name.split(".")[2])
    return 0 if name.startswith("model.embed_tokens.") else n_layers + 1


def write_checkpoint(directory: Path, shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Path:
    """Write a randomly initialised Llama checkpoint (sharded safetensors, config, tokenizer) into `directory`.

    The tensor names and shapes come from the transformers model built on the meta device, so they are exactly the
    ones `from_pretrained` expects. Tensors are drawn on `device` one shard at a time. The checkpoint is written into
    a temporary sibling and renamed at the end; a directory from an earlier run with the same settings is reused.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(shape, dtype)
    identity = {"shape": shape, "dtype": str(dtype)}
    if directory.exists():
        try:
            if json.loads((directory / MARKER).read_text()) == identity:
                return directory
        except (OSError, ValueError):
            pass
        raise ValueError(f"{directory} exists but is no checkpoint of this shape; remove it or use another --workdir")

    with torch.device("meta"):
        expected = LlamaForCausalLM(config).state_dict()  # name -> meta tensor of the right shape and dtype
    n_layers = shape["num_hidden_layers"]
    n_shards = n_layers + 2
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, meta in expected.items():
        shards[shard_of(name, n_layers)][name] = meta
    total_bytes = sum(t.numel() * t.element_size() for t in expected.values())
    directory.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory.parent).free
    if free < total_bytes * 1.05 + GIB:
        raise OSError(f"{directory.parent} has {free / GIB:.1f} GiB free; the checkpoint needs {total_bytes / GIB:.1f}")

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        generator = torch.Generator(device=device).manual_seed(SEED)
        weight_map = {}
        for index, metas in enumerate(shards):
            filename = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
            tensors = {}
            for name, meta in metas.items():
                if meta.dim() == 1:  # RMSNorm weights
                    tensors[name] = torch.ones(meta.shape, dtype=dtype)
                else:  # the usual Llama initialisation, N(0, 0.02)
                    drawn = torch.randn(meta.shape, generator=generator, device=device, dtype=torch.float32)
                    tensors[name] = drawn.mul_(0.02).to(dtype).cpu()
                weight_map[name] = filename
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config.save_pretrained(str(tmp))
        write_tiny_tokenizer(tmp)
        (tmp / MARKER).write_text(json.dumps(identity))
        tmp.chmod(0o755)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_data(path: Path, rows: int, seq_len: int) -> Path:
    """`rows` copies of one conversation longer than `seq_len` tokens (one token per ASCII character), which the
    trainer cuts to exactly `seq_len`; most of it is the assistant's reply, so most tokens are learned."""
    words = ["adapter", "base", "tenant", "quantized", "rank", "batch", "kernel", "token", "slot", "merge"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(seq_len))  # about 7 characters a word
    user, reply = text[: seq_len // 4].strip(), text[: 2 * seq_len].strip()
    line = json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    path.write_text((line + "\n") * rows)
    return path


# --- the two runs --------------------------------------------------------------------------------------------------


def reset_memory(device: torch.device) -> float | None:
    """Free what earlier phases left, reset the peak counters; returns what is still allocated (GiB)."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def run_loramux(base: Path, data: Path, workdir: Path, args: argparse.Namespace, device: torch.device) -> RunResult:
    before = reset_memory(device)
    spec = TrainingSpec(
        data=[str(data)],
        output_dir=tempfile.mkdtemp(prefix="loramux-run-", dir=workdir),  # fresh: an old one would be resumed
        base=str(base),
        target_modules=list(LINEAR_MODULES),
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        epochs=1,
        max_steps=args.warmup + args.steps,
        learning_rate=LEARNING_RATE,
        batch_size=args.batch_size,
        warmup_ratio=0.0,
        lr_schedule="constant",
        max_grad_norm=MAX_GRAD_NORM,
        max_seq_len=args.seq_len,
        gradient_checkpointing=True,
        seed=SEED,
        device=str(device),
        # The baseline's loop has none of the trainer's own helps: every row trained on, in the same order, no rows
        # of the base's answers added, every step run.
        validation_fraction=0.0,
        replay=False,
        early_stopping=False,
    )
    clock = StepClock(device, args.warmup)
    peak_load: list[float | None] = []

    def on_event(event: TrainingEvent) -> None:
        if event.kind == "started":  # model, LoRA and optimizer are ready; training starts now
            clock.mark_ready()
            peak_load.append(peak(device))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        elif event.kind == "step":
            clock.tick(event.tokens or 0, math.nan if event.loss is None else event.loss)

    try:
        train(spec, on_event)
        result = clock.result("loramux")
    finally:
        shutil.rmtree(spec.output_dir, ignore_errors=True)
    result.allocated_before_gib, result.peak_load_gib, result.peak_train_gib = before, peak_load[0], peak(device)
    if device.type == "cuda":
        result.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
    return result


def baseline_rows(base: Path, data: Path, seq_len: int) -> list[Row]:
    """The trainer's own tokenization of the same file, so both runs see the same tokens and labels."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    examples, _ = tokenize_dataset(tokenizer, load_chat_jsonl(data), seq_len)
    return build_rows(examples, seq_len, packing=False)


def collate(rows: list[Row], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input ids, attention mask and labels (the model shifts labels itself)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row.input_ids)
        labels[i, : len(row)] = torch.tensor(row.labels)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def run_baseline(base: Path, data: Path, args: argparse.Namespace, device: torch.device) -> RunResult:
    """The usual QLoRA recipe with transformers, PEFT and bitsandbytes, in a plain loop."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    before = reset_memory(device)
    clock = StepClock(device, args.warmup)
    rows = baseline_rows(base, data, args.seq_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model, info = AutoModelForCausalLM.from_pretrained(
        str(base),
        quantization_config=quantization,
        dtype=dtype,
        device_map={"": str(device)},
        output_loading_info=True,
    )
    if info["missing_keys"]:  # would be random weights of another draw: not the same base as loramux's run
        raise RuntimeError(f"the checkpoint lacks {sorted(info['missing_keys'])[:3]}")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=list(LINEAR_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(SEED)
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        optimizer: torch.optim.Optimizer = bnb.optim.PagedAdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    clock.mark_ready()
    peak_load = peak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def autocast() -> contextlib.AbstractContextManager:
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    model.train()
    for step in range(args.warmup + args.steps):
        torch.manual_seed(SEED * 1_000_003 + step)  # LoRA dropout
        batch_rows = rows[step * args.batch_size : (step + 1) * args.batch_size]
        batch = collate(batch_rows, device)
        with autocast():
            loss = model(**batch).loss  # mean over the learned tokens of the batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(sum(len(r) for r in batch_rows), loss.item())

    result = clock.result(BASELINE)
    result.allocated_before_gib, result.peak_load_gib, result.peak_train_gib = before, peak_load, peak(device)
    if device.type == "cuda":
        result.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
    del model, optimizer, params
    return result


# --- the command ---------------------------------------------------------------------------------------------------


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: list[RunResult]) -> None:
    print(
        f"\n{'implementation':22} {'load s':>7} {'tokens/s':>9} {'step ms':>8} {'loss step 1':>11} "
        f"{'peak train GiB':>14} {'peak load GiB':>13} {'reserved GiB':>12}"
    )
    for r in results:
        print(
            f"{r.impl:22} {r.load_s:7.1f} {r.tokens_per_s:9.0f} {r.step_ms_median:8.1f} {r.losses[0]:11.4f} "
            f"{gib(r.peak_train_gib):>14} {gib(r.peak_load_gib):>13} {gib(r.peak_reserved_gib):>12}"
        )
    ours, theirs = results
    line = f"loramux / baseline: tokens/s x{ours.tokens_per_s / theirs.tokens_per_s:.2f}"
    if ours.peak_train_gib and theirs.peak_train_gib:
        line += f", peak training memory x{ours.peak_train_gib / theirs.peak_train_gib:.2f}"
    print(line)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (fp32, torch AdamW), for CI")
    parser.add_argument("--steps", type=positive, default=10, help="measured optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default 3)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 1024; 128 with --tiny)")
    parser.add_argument("--batch-size", type=positive, default=1, help="rows per optimizer step (default 1)")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint here and reuse it (default: a temp dir)")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results to this JSON file (default: a new dated file in loadtests/results/; none with --tiny)",
    )
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    args.seq_len = args.seq_len or (128 if args.tiny else 1024)
    if not 32 <= args.seq_len <= 8192:
        parser.error("--seq-len must be from 32 to 8192")
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json: directory {args.json.parent} does not exist")
    if args.tiny:
        device, shape, dtype = torch.device("cpu"), TINY, torch.float32
    elif torch.cuda.is_available():
        device, shape, dtype = torch.device("cuda", torch.cuda.current_device()), LLAMA3_8B, torch.bfloat16
    else:
        print("bench_train: error: the full-size run needs a CUDA device (--tiny runs on the CPU)", file=sys.stderr)
        return 1
    if args.json is None and not args.tiny:
        args.json = dated_json_path("train")

    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loramux-bench-train-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        return bench(args, workdir, device, shape, dtype)
    except (ValueError, OSError) as exc:
        print(f"bench_train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def bench(
    args: argparse.Namespace, workdir: Path, device: torch.device, shape: dict[str, Any], dtype: torch.dtype
) -> int:
    phases: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = step()
        phases[name] = time.perf_counter() - started
        print(f"[{name}] {phases[name]:.1f} s", flush=True)
        return value

    label = "tiny" if args.tiny else "llama3-8b"
    print(f"{label} shape, {args.seq_len} tokens x {args.batch_size} rows a step, {args.warmup}+{args.steps} steps, "
          f"on {device_name(device)}", flush=True)  # fmt: skip
    base = timed("checkpoint", lambda: write_checkpoint(workdir / f"{label}-{str(dtype)[6:]}", shape, dtype, device))
    data = write_data(workdir / "data.jsonl", (args.warmup + args.steps) * args.batch_size, args.seq_len)
    ours = timed("loramux", lambda: run_loramux(base, data, workdir, args, device))
    theirs = timed(BASELINE, lambda: run_baseline(base, data, args, device))
    results = [ours, theirs]
    for r in results:
        print(f"{r.impl}: ready to train in {r.load_s:.1f} s, {args.warmup} warm-up steps in {r.warmup_s:.1f} s, "
              f"{r.measured_steps} measured steps in {r.seconds:.1f} s")  # fmt: skip
    print_table(results)
    if args.json:
        meta = {
            "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "shape": label,
            "config": shape,
            "dtype": str(dtype),
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup,
            "lora": {"r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": list(LINEAR_MODULES)},
            "versions": versions(),
        }
        args.json.write_text(json.dumps({"meta": meta, "phases_s": phases, "results": [asdict(r) for r in results]}))
        print(f"wrote {args.json}")
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
