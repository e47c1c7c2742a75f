"""The engine alone (no HTTP, no text: what the engine process does) on a model of the Llama-3-8B shape with random
weights, or on a checkpoint, against transformers + PEFT. A diagnostic: the benchmark of record is `bench_serve.py`.

    python loadtests/bench_engine.py                                   # the full run, on a GPU
    python loadtests/bench_engine.py --tiny --json tiny.json           # a tiny model, any device (CI smoke test)
    python loadtests/bench_engine.py --only w1,stream --base CKPT      # a subset, on a checkpoint (bench_serve)

Random weights are generated layer by layer on the device and each decoder linear layer is quantized to NF4 (double
quantization) as it is made, as the loader does: no full-precision copy of the model ever exists. Speed does not
depend on the weights' values. Requests go in as token ids and their tokens come out as ids, step by step, as in
the engine process. Parts (`--only`):

- w1: 256 requests at once, 128 prompt tokens, exactly 128 generated (EOS ignored), 32 adapters of rank 16 on all
  seven modules, round-robin; with the adapters and with none; for each `--sampling` (greedy, default: temperature
  1.0, mix: the load generator's mix of default, top_p 0.9, greedy and seeded requests).
- peft / hf: transformers + PEFT mixed batch (`adapter_names`) and transformers `generate` base only, batches of 32
  (bitsandbytes NF4 base). Measured on `--baseline-batches` batches of `--baseline-gen` tokens: a rate in tokens/s.
- stream: 1 request, 128 prompt tokens, 512 generated, with an adapter and without (greedy).
- w2: distinct adapters of ranks 8 to 64 on q_proj and v_proj, Zipf popularity (exponent 1), Poisson arrivals at a
  rate above what the engine serves, 64 slots (the memory of 64 rank-64 adapters, paged by rank 8: it holds more
  adapters of lower rank) and a CPU cache of 256 adapters: tokens/s, time to first token.
- load: time to move a rank-16 all-module adapter from the CPU cache into a slot, and from disk into a slot.
- mixed: what a step with prompt chunks beside a decode batch costs: `--mixed-running` sequences decoding (W2's
  adapters, 16 of them, or none), then steps that add 1 to 12 prompts of `--prompt` tokens; each step's time against
  a decode step's, fitted as a fixed part plus a part per prompt token (the engine's own step counters say which
  steps were mixed). With `--profile` on a GPU, a decode step and a mixed step of 6 prompts by kernel kind.

Peak GPU memory is that of the loramux parts. With `--repeats N`, W1 (with and without adapters, in turn) and W2
(each time on a fresh engine) run N times and the run with the median tokens/s stands for each; every run's figure
is kept. A table goes to stdout, all figures to `--json`.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.record import dated_json_path, help_text
from loadtests.shapes import LLAMA3_8B
from loadtests.workload import SAMPLING
from loramux.core.adapter_source import AdapterNotFoundError, AdapterRef, ResolvedAdapter
from loramux.core.model_config import ATTENTION_MODULES, LINEAR_MODULES, ModelConfig
from loramux.server.engine.llm_engine import STEP_KINDS, EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.models.llama import LlamaForCausalLM
from loramux.server.models.loader import BaseModel, compute_dtype_for, load_base
from loramux.server.models.lora_weights import base_shapes, load_lora

T = TypeVar("T")
PARTS = ("w1", "peft", "hf", "stream", "w2", "load", "mixed")
TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 500000.0,
    "max_position_embeddings": 2048,
}


class RandomWeights(dict):
    """The state dict the model builder pops from, made on demand on the device: one tensor exists at a time until
    the builder has quantized it (`LlamaForCausalLM` pops each tensor once)."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.device, self.dtype = config, device, dtype
        self.shapes = {f"{m}": s for m, s in base_shapes(config).items()}
        self.generator = torch.Generator(device).manual_seed(0)

    def pop(self, name: str, default=None):
        c = self.config
        if name.endswith("norm.weight"):
            return torch.ones(c.hidden_size, device=self.device, dtype=self.dtype)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (c.vocab_size, c.hidden_size)
        else:
            shape = self.shapes[name.split(".")[-2]]
        w = torch.empty(shape, device=self.device, dtype=self.dtype)
        return w.normal_(0.0, 0.02, generator=self.generator)


def build_base(raw: dict, device: torch.device) -> BaseModel:
    config = ModelConfig(**raw)
    dtype = compute_dtype_for(device)
    model = LlamaForCausalLM(config, RandomWeights(config, device, dtype), dtype).to(device).eval()
    return BaseModel("random", Path("."), config, model, tokenizer=None)


def write_adapter(
    directory: Path, rank: int, modules: list[str], config: ModelConfig, seed: int, scale: float = 0.01
) -> Path:
    """A PEFT LoRA directory: rank `rank` on `modules` of every layer, random A and B of standard deviation `scale`
    (bf16)."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = base_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in modules:
            out, inp = shapes[module]
            group = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) * scale).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * scale).bfloat16()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": modules}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


class LocalSource:
    """Adapters by name from directories; `alias` lets many distinct adapter names share one weights file."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def add(self, repo: str, path: Path) -> None:
        self.paths[repo] = path

    def resolve(self, ref: AdapterRef, tenant: str | None) -> ResolvedAdapter:
        if ref.repo not in self.paths:
            raise AdapterNotFoundError(f"adapter {ref} not found")
        return ResolvedAdapter(ref.repo, "0" * 40, self.paths[ref.repo])


def alias_adapter(root: Path, name: str, weights_dir: Path) -> Path:
    """A distinct adapter directory whose weights file links to `weights_dir`'s (its own config, its own name)."""
    target = root / name
    target.mkdir(parents=True, exist_ok=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        if not (target / file).exists():
            os.symlink(weights_dir / file, target / file)
    return target


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def sampling_params(kind: str, n: int, gen: int, seed: int = 0) -> list[SamplingParams]:
    """n requests' sampling as the load generator sends them (`loadtests.workload.SAMPLING`), EOS ignored; fields a
    request leaves out take the server's defaults (temperature 1.0)."""
    rng = random.Random(seed)
    kinds = SAMPLING[kind]
    out = []
    for _ in range(n):
        fields = dict(rng.choices([f for _, f in kinds], weights=[w for w, _ in kinds])[0])
        if "seed" in fields:
            fields["seed"] = rng.randrange(2**31)
        out.append(SamplingParams(max_tokens=gen, ignore_eos=True, **fields))
    return out


class Timed:
    """Host seconds in the scheduler and the forward of each step, recorded on one engine (its instance's methods
    wrapped) until `remove`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.schedule = self.forward = 0.0
        self.decode_only = False
        schedule, run = engine.scheduler.schedule, engine.runner.run

        def timed_schedule():
            begun = time.perf_counter()
            try:
                return schedule()
            finally:
                self.schedule += time.perf_counter() - begun

        def timed_run(chunks):
            self.decode_only = all(len(c.token_ids) == 1 for c in chunks)
            begun = time.perf_counter()
            try:
                return run(chunks)
            finally:
                self.forward += time.perf_counter() - begun

        engine.scheduler.schedule = timed_schedule  # type: ignore[method-assign]
        engine.runner.run = timed_run  # type: ignore[method-assign]

    def take(self) -> tuple[float, float, bool]:
        taken = (self.schedule, self.forward, self.decode_only)
        self.schedule = self.forward = 0.0
        self.decode_only = False
        return taken

    def remove(self) -> None:
        del self.engine.scheduler.schedule, self.engine.runner.run


def run_batch(
    engine: LLMEngine, ids: list[list[int]], params: list[SamplingParams], adapters: list[str | None]
) -> dict:
    """Add every request at once and step until all are done, as the engine process does (token ids in and out):
    generated tokens/s over the wall time, and each step's host time by phase."""
    timed = Timed(engine)
    steps: list[tuple[float, bool]] = []  # (seconds, decode tokens only) of every step that ran
    decode_phases: list[dict] = []  # host milliseconds by phase of each decode step
    tokens = 0
    try:
        sync(engine.base.device)
        started = time.perf_counter()
        for i, (prompt, p, adapter) in enumerate(zip(ids, params, adapters, strict=True)):
            engine.add(f"b{i}", prompt, p, adapter)
        while engine.has_unfinished():
            timed.take()
            begun = time.perf_counter()
            outputs = engine.step()
            if outputs is None:
                engine.wait_for_work(0.01)
                continue
            wall = time.perf_counter() - begun
            schedule, forward, decode_only = timed.take()
            for out in outputs:
                if out.error is not None:
                    raise out.error
                tokens += len(out.token_ids)
            steps.append((wall, decode_only))
            if decode_only:
                decode_phases.append({"ms": 1e3 * wall, "schedule_ms": 1e3 * schedule, "forward_host_ms": 1e3 * forward,
                                      "sample_and_rest_ms": 1e3 * (wall - schedule - forward)})  # fmt: skip
        sync(engine.base.device)
        seconds = time.perf_counter() - started
    finally:
        timed.remove()
    expected = sum(p.max_tokens for p in params)
    assert tokens == expected, f"generated {tokens} tokens, expected {expected}"
    print(f"  {len(ids)} requests x {params[0].max_tokens} tokens: {tokens / seconds:.1f} tokens/s", flush=True)
    decode = [t for t, d in steps if d]
    return {"requests": len(ids), "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steps": len(steps), "decode_steps": len(decode),
            "decode_step_ms_median": 1e3 * statistics.median(decode) if decode else None,
            "decode_phase_ms_median": {k: statistics.median(x[k] for x in decode_phases) for k in decode_phases[0]}
            if decode_phases else None,
            "decode_seconds": sum(decode), "other_step_seconds": sum(t for t, d in steps if not d),
            "outside_steps_seconds": seconds - sum(t for t, _ in steps)}  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """Of repeated runs, the one with the median tokens/s (the lower of the two middle ones for an even count), with
    every run's tokens/s and time-to-first-token figures beside it."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        keys = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "seconds")
        chosen["runs"] = [{k: r[k] for k in keys if k in r} for r in runs]
    return chosen


def w1_config(args, n: int, plen: int, gen: int) -> EngineConfig:
    blocks = n * math.ceil((plen + gen) / 16) + 64
    return EngineConfig(
        num_slots=args.slots or args.w1_adapters, max_lora_rank=args.max_lora_rank or args.w1_rank,
        num_kv_blocks=blocks, max_num_seqs=args.max_num_seqs or n, max_num_batched_tokens=args.max_batched_tokens,
        max_queue=4 * n, adapter_cache_bytes=16 * 2**30,  # all 32 (84 MB each, bf16 in pinned memory) stay cached
    )  # fmt: skip


def bench_w1(base: BaseModel, args, root: Path, results: dict) -> None:
    n, plen, gen = args.w1_requests, args.prompt, args.gen
    source = LocalSource()
    # 32 distinct adapters (names, cache entries, slots); their weights files are 4 distinct ones, linked, since
    # speed does not depend on the values and writing 32 x 84 MB of random weights would dominate the run
    for i in range(args.w1_adapters):
        if i < 4:
            path = write_adapter(root / f"w1-{i}", args.w1_rank, list(LINEAR_MODULES), base.config, seed=i)
        else:
            path = alias_adapter(root, f"w1-{i}", root / f"w1-{i % 4}")
        source.add(f"bench/w1-{i}", path)
    ids = prompts(n, plen, base.config.vocab_size, seed=1)
    names = [f"bench/w1-{i % args.w1_adapters}" for i in range(n)] if args.w1_adapters else [None] * n
    engine = LLMEngine(base, source, w1_config(args, n, plen, gen))
    try:
        # warm-up: every decode graph, the slots filled, the kernels compiled
        engine.warm_up()
        warm = sampling_params("mix", n, min(gen, 8))
        run_batch(engine, ids, warm, names)
        run_batch(engine, ids, warm, [None] * n)
        if "w1" in args.parts:
            for kind in args.sampling:
                params = sampling_params(kind, n, gen)
                lora_runs, base_runs = [], []
                for _ in range(args.repeats):  # in turn, so that a slow spell of the machine meets both
                    if args.w1_adapters:
                        lora_runs.append(run_batch(engine, ids, params, names))
                    base_runs.append(run_batch(engine, ids, params, [None] * n))
                if lora_runs:
                    results[f"w1_lora_{kind}"] = median_run(lora_runs)
                results[f"w1_base_{kind}"] = median_run(base_runs)
        if "stream" in args.parts:
            one = prompts(1, plen, base.config.vocab_size, seed=2)
            run_batch(engine, one, sampling_params("greedy", 1, 8), [names[0]])
            results["stream_greedy"] = run_batch(engine, one, sampling_params("greedy", 1, args.stream_gen), [names[0]])
            results["stream_base_greedy"] = run_batch(
                engine, one, sampling_params("greedy", 1, args.stream_gen), [None]
            )
        if "load" in args.parts and args.w1_adapters:
            results["load"] = bench_load(engine, root / "w1-0", base)
        if args.profile and base.device.type == "cuda":
            results["decode_profile"] = profile_decode(engine, ids, names)
            results["decode_profile_base"] = profile_decode(engine, ids, [None] * n)
    finally:
        engine.shutdown()
        gc.collect()


def bench_load(engine: LLMEngine, adapter_dir: Path, base: BaseModel) -> dict:
    """A rank-16 all-module adapter into slot 0, until its copies are done: from the CPU cache (weights already
    read) and from disk.

    The CPU cache holds what the engine's fetch reads: the slots' dtype, in a region of the page-locked arena; the
    same write from the fp32 pageable tensors `load_lora` returns by default is timed too. From disk: read on this
    thread (`load_lora`), and, where the engine has reader processes, read by one of them as the engine does."""
    device = base.device
    writer, arena, readers = engine.writer, engine.adapters.arena, engine.adapters.readers
    cpu, cpu_fp32, disk, via_reader = [], [], [], []

    def taking(regions: list[int]) -> Callable[[int], tuple[int | None, torch.Tensor]]:
        """An allocator of arena regions (their offsets kept in `regions`), pageable where the arena has no room."""

        def take(nbytes: int) -> tuple[int | None, torch.Tensor]:
            found = arena.allocate(nbytes) if arena is not None else None
            if found is None:
                return None, torch.empty(nbytes, dtype=torch.uint8)
            regions.append(found[0])
            return found

        return take

    for _ in range(5):
        regions: list[int] = []
        take = taking(regions)
        started = time.perf_counter()
        weights = load_lora(
            adapter_dir, base.config, writer.dtype, lambda n, take=take: take(n)[1],
            b_rank_major=writer.b_rank_major,
        )  # fmt: skip
        writer.write(0, weights)
        sync(device)
        disk.append(time.perf_counter() - started)
        started = time.perf_counter()
        writer.write(0, weights)
        sync(device)
        cpu.append(time.perf_counter() - started)
        raw = load_lora(adapter_dir, base.config)
        started = time.perf_counter()
        writer.write(0, raw)
        sync(device)
        cpu_fp32.append(time.perf_counter() - started)
        for offset in regions:
            arena.free(offset)
        if readers is not None:
            taken: list[int] = []
            started = time.perf_counter()
            writer.write(0, readers.read(adapter_dir, taking(taken)))
            sync(device)
            via_reader.append(time.perf_counter() - started)
            for offset in taken:
                arena.free(offset)
    return {"cpu_to_slot_ms": 1e3 * statistics.median(cpu), "disk_to_slot_ms": 1e3 * statistics.median(disk),
            "disk_to_slot_via_reader_ms": 1e3 * statistics.median(via_reader) if via_reader else None,
            "cpu_fp32_pageable_to_slot_ms": 1e3 * statistics.median(cpu_fp32),
            "adapter_cached_mib": weights.nbytes() / 2**20, "adapter_fp32_mib": raw.nbytes() / 2**20,
            "cached_in_arena": bool(regions)}  # fmt: skip


def profile_decode(engine: LLMEngine, ids: list[list[int]], names: list[str | None]) -> dict:
    """Where a decode step of the W1 batch spends its GPU time: NF4 matmuls, attention, LoRA, the rest (eager)."""
    runner = engine.runner
    graphs, prompt_graphs = runner.graphs, runner.prompt_graphs
    runner.graphs = runner.prompt_graphs = None  # eager, so that the profiler sees every kernel
    walls: dict[int, float] = {}  # wall seconds of the profiled runs, by tokens generated

    def by_kernel(max_tokens: int) -> dict[str, float]:
        begun = time.perf_counter()
        _, kernels = gpu_time_by_kernel(
            lambda: run_batch(engine, ids, sampling_params("greedy", len(ids), max_tokens), names)
        )
        walls[max_tokens] = time.perf_counter() - begun
        return kernels

    try:
        # the prefill steps are the same in both runs: the difference is 4 decode steps of the whole batch
        one, five = by_kernel(1), by_kernel(5)
    finally:
        runner.graphs, runner.prompt_graphs = graphs, prompt_graphs
    step = {k: (five.get(k, 0.0) - one.get(k, 0.0)) / 4 for k in five.keys() | one.keys()}
    kinds = kernel_kinds(step)
    total = sum(kinds.values())
    top = dict(sorted(step.items(), key=lambda kv: -kv[1])[:25])
    return {
        "note": "one eager decode step of the W1 batch: GPU microseconds by kind, and the top kernels; then the "
                "prefill of the whole batch (the run of 1 token: its prefill steps and one sampling)",
        "us": kinds, "share": {k: v / total for k, v in kinds.items()} if total else {}, "top_kernels_us": top,
        "wall_s": walls, "prefill_us": kernel_kinds(one),
        "prefill_top_kernels_us": dict(sorted(one.items(), key=lambda kv: -kv[1])[:25]),
    }  # fmt: skip


def kernel_kinds(kernels: dict[str, float]) -> dict[str, float]:
    """GPU time by kernel name -> by kind: NF4 dequantization, GEMMs, LoRA, attention, the rest."""
    kinds = dict.fromkeys(("nf4_dequant", "gemm", "lora", "attention", "other"), 0.0)
    for key, t in kernels.items():
        name = key.lower()
        if "dequant" in name or "4bit" in name:
            kinds["nf4_dequant"] += t
        elif "shrink" in name or "expand" in name:
            kinds["lora"] += t
        elif "attention" in name or "fmha" in name or "flash" in name or ("index" in name and "copy" not in name):
            kinds["attention"] += t
        elif "gemm" in name or "gemv" in name or "cutlass" in name or "sm90" in name:
            kinds["gemm"] += t
        else:
            kinds["other"] += t
    return kinds


MIXED_PROMPTS = (1, 2, 4, 6, 12)  # prompts added to the decode batch, one step each


def bench_mixed(base: BaseModel, args, root: Path) -> dict:
    """A decode step against steps that also take 1 to 12 new prompts, with W2's adapters and without."""
    modules, ranks = ["q_proj", "v_proj"], (8, 16, 32, 64)
    source, names = LocalSource(), []
    for r in ranks:
        weights = write_adapter(root / f"mixed-rank{r}", r, modules, base.config, seed=200 + r)
        for j in range(4):
            source.add(f"bench/mixed-{r}-{j}", alias_adapter(root / "mixed", f"a{r}-{j}", weights))
            names.append(f"bench/mixed-{r}-{j}")
    running, plen = args.mixed_running, args.prompt
    counts = [n for n in MIXED_PROMPTS if running + n * plen <= args.max_batched_tokens]  # each in one step
    seqs = running + max(counts)
    # W2's slots (8 at the least: they hold all 16 adapters, which the tiny run's 3 would not)
    config = EngineConfig(
        num_slots=max(args.w2_slots, 8), max_lora_rank=64, num_kv_blocks=seqs * math.ceil((plen + 256) / 16) + 64,
        max_num_seqs=seqs, max_num_batched_tokens=args.max_batched_tokens, max_queue=4 * seqs,
        adapter_cache_bytes=2 * 2**30,
    )  # fmt: skip
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(base, source, config)
    added = itertools.count()

    def add(n: int, adapters: list[str] | None) -> list[str]:
        out = []
        for _ in range(n):
            i = next(added)
            prompt = prompts(1, plen, base.config.vocab_size, seed=1000 + i)[0]
            engine.add(f"m{i}", prompt, params, adapters[i % len(adapters)] if adapters else None)
            out.append(f"m{i}")
        return out

    def step(profiled: dict | None = None) -> tuple[str, float, int]:
        """One step that ran a forward -> (its kind, its seconds, its prompt tokens), from the engine's counters;
        with `profiled`, each call of the engine's step runs under the CUDA profiler and `profiled["us"]` keeps the
        GPU time by kernel kind of the one that ran the forward."""
        before = engine.stats()
        while True:
            if profiled is None:
                ran_step = engine.step() is not None
            else:
                ran_step, profiled["us"] = gpu_time_by_kind(lambda: engine.step() is not None)
            if not ran_step:
                engine.wait_for_work(0.01)
                continue
            after = engine.stats()
            ran = [k for k in STEP_KINDS if after[f"steps_{k}"] > before[f"steps_{k}"]]
            if ran:  # (a step may also end with no forward: slot writes waited for, aborts reported)
                kind = ran[0]
                seconds = after[f"step_seconds_{kind}"] - before[f"step_seconds_{kind}"]
                return kind, seconds, int(after[f"step_prompt_tokens_{kind}"] - before[f"step_prompt_tokens_{kind}"])

    def mixed_step(n: int, adapters: list[str] | None, profiled: dict | None = None) -> float:
        """The seconds of a step that took `n` new prompts whole beside the decode batch (with `profiled`, that
        step's GPU time by kernel kind in `profiled["us"]`)."""
        for _ in range(20):
            new = add(n, adapters)
            time.sleep(0.02)  # their adapters resolve on the fetch threads, off the step loop
            for _ in range(100):  # decode steps until the new prompts are in
                if (ran := step(profiled))[0] != "decode":
                    break
            for request_id in new:
                engine.abort(request_id)
            step()
            kind, seconds, tokens = ran
            if kind == "mixed" and tokens == n * plen:
                return seconds
        raise RuntimeError(f"no step took {n} new prompts at once in 20 tries")

    results: dict = {"running": running, "prompt_tokens_each": plen}
    try:
        engine.warm_up()
        for label, adapters in (("adapters", names), ("base", None)):
            first = add(running, adapters)
            while step()[0] != "decode":  # every prompt in
                pass
            decode = [step()[1] for _ in range(10)]
            figures: dict = {"decode_ms_median": 1e3 * statistics.median(decode), "mixed_ms_median": {}}
            for n in counts:
                walls = [mixed_step(n, adapters) for _ in range(args.repeats + 2)]
                figures["mixed_ms_median"][n * plen] = 1e3 * statistics.median(walls)
            xs = list(figures["mixed_ms_median"])
            ys = [figures["mixed_ms_median"][x] - figures["decode_ms_median"] for x in xs]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            figures["extra_fixed_ms"], figures["extra_us_per_prompt_token"] = my - slope * mx, 1e3 * slope
            if args.profile and base.device.type == "cuda":
                decode_profile: dict = {}
                mixed_profile: dict = {}
                step(decode_profile)
                mixed_step(6, adapters, mixed_profile)
                figures["profile"] = {"decode": decode_profile["us"], "mixed": mixed_profile["us"]}
            for request_id in first:
                engine.abort(request_id)
            while engine.has_unfinished():
                engine.step()
            results[label] = figures
            print(f"  mixed steps, {label}: decode {figures['decode_ms_median']:.1f} ms; a prompt pass adds "
                  f"{figures['extra_fixed_ms']:.1f} ms + {figures['extra_us_per_prompt_token']:.1f} us a prompt "
                  "token", flush=True)  # fmt: skip
        return results
    finally:
        engine.shutdown()
        gc.collect()


def gpu_time_by_kernel(fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """`fn()` under the CUDA profiler -> its result, and the GPU microseconds of each kernel it ran, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
    return result, {e.key: getattr(e, "device_time_total", 0.0) for e in prof.key_averages()}


def gpu_time_by_kind(fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """`fn()` under the CUDA profiler -> its result, and the GPU microseconds of the kernels it ran by kind."""
    result, kernels = gpu_time_by_kernel(fn)
    return result, kernel_kinds(kernels)


def triton_variants() -> int:
    """Kernel variants Triton has compiled in this process for loramux's kernels (0 without Triton)."""
    try:
        from loramux.server.layers import attention_kernels, lora_kernels
    except ImportError:
        return 0
    count = 0
    for module in (lora_kernels, attention_kernels):
        for fn in vars(module).values():
            for caches in getattr(fn, "device_caches", {}).values():
                count += len(caches[0])
    return count


def bench_w2(base: BaseModel, args, root: Path) -> dict:
    """Many adapters, Zipf popularity, Poisson arrivals above the serving rate: tokens/s and TTFT percentiles. Arrivals
    are added between steps, as the engine process takes them from its socket."""
    rng = random.Random(3)
    ranks = (8, 16, 32, 64)
    modules = ["q_proj", "v_proj"]
    shared = {r: write_adapter(root / f"w2-rank{r}", r, modules, base.config, seed=100 + r) for r in ranks}
    source = LocalSource()
    for i in range(args.w2_adapters):
        source.add(f"bench/w2-{i}", alias_adapter(root / "w2", f"a{i}", shared[ranks[i % len(ranks)]]))
    dtype = compute_dtype_for(base.device)  # the CPU cache holds adapters in the slots' dtype
    per_adapter = {r: load_lora(shared[r], dtype=dtype).nbytes() for r in ranks}
    n, plen, gen = args.w2_requests, args.prompt, args.gen
    blocks = args.w1_requests * math.ceil((plen + gen) / 16) + 64
    config = EngineConfig(
        num_slots=args.w2_slots, max_lora_rank=64, num_kv_blocks=blocks, max_num_seqs=args.w1_requests,
        max_num_batched_tokens=args.max_batched_tokens, max_queue=4 * n,
        adapter_cache_bytes=int(args.w2_cpu_cache * statistics.mean(per_adapter.values())),
    )  # fmt: skip
    weights = [1.0 / (k + 1) for k in range(args.w2_adapters)]  # Zipf, exponent 1
    chosen = rng.choices(range(args.w2_adapters), weights=weights, k=n)
    ids = prompts(n, plen, base.config.vocab_size, seed=4)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(args.w2_rate)
        arrivals.append(t)
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(base, source, config)
    first: dict[int, float] = {}
    submitted: dict[int, float] = {}
    kinds: dict[str, list[float]] = {"decode": [], "mixed": [], "prefill": []}  # step walls by kind
    running: list[int] = []
    timed = Timed(engine)
    try:
        engine.warm_up()
        compiled = triton_variants()
        started = time.perf_counter()
        added, done = 0, 0
        while done < n:
            now = time.perf_counter() - started
            while added < n and arrivals[added] <= now:
                engine.add(str(added), ids[added], params, f"bench/w2-{chosen[added]}")
                submitted[added] = started + arrivals[added]
                added += 1
            timed.take()
            begun = time.perf_counter()
            outputs = engine.step()
            if outputs is None:
                wait = arrivals[added] - (time.perf_counter() - started) if added < n else 0.01
                engine.wait_for_work(max(0.0, min(wait, 0.01)))
                continue
            wall = time.perf_counter() - begun
            for out in outputs:
                if out.error is not None:
                    raise out.error
                i = int(out.request_id)
                first.setdefault(i, time.perf_counter())
                done += out.finished
            _, _, decode_only = timed.take()
            kinds["decode" if decode_only else "mixed"].append(wall)
            running.append(len(engine.scheduler.running))
        seconds = time.perf_counter() - started
        ttft = sorted(first[i] - submitted[i] for i in range(n))
        result = {
            "requests": n, "adapters": args.w2_adapters, "distinct_used": len(set(chosen)), "slots": args.w2_slots,
            "cpu_cache_adapters": args.w2_cpu_cache, "arrival_rate_per_s": args.w2_rate, "seconds": seconds,
            "tokens_per_s": n * gen / seconds, "ttft_p50_s": ttft[len(ttft) // 2],
            "ttft_p99_s": ttft[min(n - 1, int(0.99 * n))], "steps": len(running),
            "running_mean": statistics.mean(running) if running else 0.0,
            "steps_by_kind": {k: {"steps": len(v), "seconds": sum(v),
                                  "ms_median": 1e3 * statistics.median(v) if v else None} for k, v in kinds.items()},
            "stats": engine.stats(), "triton_variants_compiled": triton_variants() - compiled,
        }  # fmt: skip
        print(f"  W2: {result['tokens_per_s']:.1f} tokens/s", flush=True)
        return result
    finally:
        timed.remove()
        engine.shutdown()
        gc.collect()


def build_hf(raw: dict, device: torch.device):
    """The same shape in transformers, every decoder linear layer a bitsandbytes NF4 `Linear4bit` (double quant),
    quantized layer by layer as it is made."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    dtype = compute_dtype_for(device)
    config = LlamaConfig(**raw, torch_dtype=dtype)
    with torch.device("meta"):
        model = HFLlama(config)
    model.to_empty(device=device)
    model.to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for _, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and child_name in LINEAR_MODULES:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
                    w = torch.empty(child.out_features, child.in_features, device=device, dtype=dtype)
                    w.normal_(0.0, 0.02, generator=gen)
                    q.weight = bnb.nn.Params4bit(w.cpu() if device.type != "cuda" else w, requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4").to(device)  # fmt: skip
                    setattr(module, child_name, q)
            for p_name, p in module.named_parameters(recurse=False):
                if not isinstance(p, bnb.nn.Params4bit):
                    if p_name == "weight" and p.dim() == 1:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02, generator=gen)
    rope = model.model.rotary_emb
    model.model.rotary_emb = type(rope)(config).to(device)  # its inverse frequencies were on the meta device
    return model.eval()


def hf_rate(model, batches: int, batch: int, plen: int, gen: int, vocab: int, **kwargs) -> dict:
    device = next(model.parameters()).device
    ids = torch.tensor(prompts(batch, plen, vocab, seed=5), device=device)
    kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2}, **kwargs)  # warm-up
        sync(device)
        started = time.perf_counter()
        tokens = 0
        for _ in range(batches):
            out = model.generate(ids, **kw, **kwargs)
            tokens += (out.shape[1] - plen) * batch
        sync(device)
    seconds = time.perf_counter() - started
    print(f"  transformers batch {batch} x {gen} tokens: {tokens / seconds:.1f} tokens/s", flush=True)
    return {"batch": batch, "batches": batches, "generated_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}  # fmt: skip


def bench_baselines(raw: dict, args, device: torch.device, results: dict) -> None:
    model = build_hf(raw, device)
    vocab = raw["vocab_size"]
    if "hf" in args.parts:
        results["hf_base"] = hf_rate(model, args.baseline_batches, 32, args.prompt, args.baseline_gen, vocab)
    if "peft" in args.parts:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEAR_MODULES), lora_dropout=0.0)
        peft_model = get_peft_model(model, cfg, adapter_name="a0").eval()
        for i in range(1, args.w1_adapters):
            peft_model.add_adapter(f"a{i}", cfg)
        peft_model.eval()
        names = [f"a{i % args.w1_adapters}" for i in range(32)]
        results["peft_mixed"] = hf_rate(peft_model, args.baseline_batches, 32, args.prompt, args.baseline_gen, vocab,
                                        adapter_names=names)  # fmt: skip
    del model
    gc.collect()


def table(results: dict) -> str:
    rows = [(f"loramux W1, {who}, {kind}", f"w1_{key}_{kind}") for kind in ("greedy", "default", "mix")
            for who, key in (("32 adapters", "lora"), ("no adapters", "base"))]  # fmt: skip
    rows += [
        ("transformers + PEFT mixed batch (32)", "peft_mixed"),
        ("transformers generate base only (32)", "hf_base"),
        ("loramux one stream (adapter)", "stream_greedy"),
        ("loramux one stream (base)", "stream_base_greedy"),
        ("loramux W2 (Zipf, Poisson)", "w2"),
    ]
    lines = [f"{'system':44} {'tokens/s':>10}", "-" * 56]
    for label, key in rows:
        if key in results:
            lines.append(f"{label:44} {results[key]['tokens_per_s']:10.1f}")
    lora, base = results.get("w1_lora_greedy"), results.get("w1_base_greedy")
    if lora and base:
        lines.append(f"{'W1 adapters / no adapters (greedy)':44} {lora['tokens_per_s'] / base['tokens_per_s']:10.3f}")
    if "w2" in results:
        w2 = results["w2"]
        if lora:
            lines.append(f"{'W2 / W1 (with adapters, greedy)':44} {w2['tokens_per_s'] / lora['tokens_per_s']:10.3f}")
        lines.append(f"{'W2 TTFT p50 / p99 (s)':44} {w2['ttft_p50_s']:.3f} / {w2['ttft_p99_s']:.3f}")
    for key in results:
        if "runs" in results[key] if isinstance(results[key], dict) else False:
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[key]["runs"])
            lines.append(f"{key + ', each run':44} {each}")
    if "load" in results:
        ld = results["load"]
        label = "adapter -> slot: CPU cache / disk (ms)"
        lines.append(f"{label:44} {ld['cpu_to_slot_ms']:.1f} / {ld['disk_to_slot_ms']:.1f}")
        if ld.get("disk_to_slot_via_reader_ms") is not None:
            label = "adapter -> slot: disk via a reader process (ms)"
            lines.append(f"{label:44} {ld['disk_to_slot_via_reader_ms']:.1f}")
    for label in ("adapters", "base"):
        mixed = results.get("mixed", {}).get(label)
        if mixed:
            text = f"{mixed['extra_fixed_ms']:.1f} ms + {mixed['extra_us_per_prompt_token']:.1f} us/token"
            lines.append(f"{'a prompt pass beside decoding, ' + label:44} {text}")
    if "peak_gpu_memory_gib" in results:
        lines.append(f"{'peak GPU memory, loramux (GiB)':44} {results['peak_gpu_memory_gib']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=help_text(__doc__))
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test, any device)")
    p.add_argument("--base", type=Path, help="a checkpoint directory instead of random weights of the 8B shape")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    p.add_argument(
        "--json",
        type=Path,
        help="write all figures here (default: a new dated file under loadtests/results/; none with --tiny)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sampling", default="greedy", help=f"W1's sampling, comma-separated of {','.join(SAMPLING)}")
    p.add_argument("--w1-requests", type=int, default=256)
    p.add_argument("--w1-adapters", type=int, default=32)
    p.add_argument("--w1-rank", type=int, default=16)
    p.add_argument("--slots", type=int, help="W1's slots (default: one per adapter)")
    p.add_argument("--max-lora-rank", type=int, help="W1's slot rank (default: --w1-rank)")
    p.add_argument("--max-num-seqs", type=int, help="W1's batch (default: --w1-requests)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--stream-gen", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--baseline-batches", type=int, default=1)
    p.add_argument("--baseline-gen", type=int, default=32, help="tokens per baseline batch (they are slow)")
    p.add_argument("--w2-requests", type=int, default=512)
    p.add_argument("--w2-adapters", type=int, default=1000)
    p.add_argument("--w2-slots", type=int, default=64)
    p.add_argument("--w2-cpu-cache", type=int, default=256, help="adapters the CPU cache holds (by mean size)")
    p.add_argument("--w2-rate", type=float, default=100.0, help="Poisson arrivals per second")
    p.add_argument(
        "--repeats", type=int, default=1, help="W1 and W2 this many times each (W2 on a fresh engine): medians"
    )
    p.add_argument("--mixed-running", type=int, default=200, help="sequences decoding beside the mixed steps' prompts")
    p.add_argument(
        "--profile", action="store_true", help="profile a decode step of W1 and the mixed part's steps (GPU)"
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.w1_requests, args.w1_adapters, args.prompt, args.gen = 8, 4, 8, 4
        args.stream_gen, args.baseline_gen, args.max_batched_tokens = 8, 4, 64
        # W2's requests all but at once: a tiny step takes a few ms, and at 200/s a fast CPU never queued any
        args.w2_requests, args.w2_adapters, args.w2_slots, args.w2_cpu_cache, args.w2_rate = 12, 10, 3, 5, 5000.0
        args.mixed_running = 4
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.json is None and not args.tiny:
        args.json = dated_json_path("engine")
    args.parts = [x for x in args.only.split(",") if x]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    args.sampling = [x for x in args.sampling.split(",") if x]
    if set(args.sampling) - set(SAMPLING):
        p.error(f"--sampling: choose from {','.join(SAMPLING)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    raw = TINY if args.tiny else LLAMA3_8B
    results: dict = {
        "command": " ".join(["python", "loadtests/bench_engine.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "model": str(args.base) if args.base else raw,
    }  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
            run_parts(raw, args, device, Path(tmp), results)
    finally:  # what was measured is kept even when a later part fails
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"wrote {args.json}")
    return 0


def run_parts(raw: dict, args: argparse.Namespace, device: torch.device, root: Path, results: dict) -> None:
    """loramux's W1, one stream and load times, then the baselines (while loramux's model stays resident), then W2."""
    cuda = device.type == "cuda"
    base = None
    if any(part in args.parts for part in ("w1", "stream", "load", "w2", "mixed")):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        base = load_base(str(args.base), device=device) if args.base else build_base(raw, device)
        print(f"built the model in {time.perf_counter() - started:.1f}s", flush=True)
        results["build_seconds"] = time.perf_counter() - started
        if any(part in args.parts for part in ("w1", "stream", "load")):
            bench_w1(base, args, root, results)
            if cuda:
                results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if ("peft" in args.parts or "hf" in args.parts) and not args.base:
        bench_baselines(raw, args, device, results)
        if cuda:
            torch.cuda.empty_cache()
    if "w2" in args.parts:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        runs: list[dict] = []
        for i in range(args.repeats):  # each on a fresh engine: cold caches, as the first
            runs.append(bench_w2(base, args, root / f"w2-{i}"))
            if cuda and i == 0:
                results["peak_gpu_memory_w2_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if cuda:
                torch.cuda.empty_cache()
        results["w2"] = median_run(runs)
    if "mixed" in args.parts:
        results["mixed"] = bench_mixed(base, args, root / "mixed")


if __name__ == "__main__":
    sys.exit(main())
