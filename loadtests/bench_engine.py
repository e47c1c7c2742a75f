"""End-to-end engine benchmark on a model of the Llama-3-8B shape with random weights, against transformers + PEFT.

    python loadtests/bench_engine.py --json engine.json             # the full run, on a GPU
    python loadtests/bench_engine.py --tiny --json tiny.json        # a tiny model, any device (CI smoke test)
    python loadtests/bench_engine.py --only w1,stream               # a subset

Weights are generated layer by layer on the device and each decoder linear layer is quantized to NF4 (double
quantization) as it is made, as the loader does: no full-precision copy of the model ever exists. Speed does not
depend on the weights' values. Parts (`--only`):

- w1: 256 requests at once, 128 prompt tokens, exactly 128 generated (EOS ignored), 32 adapters of rank 16 on all
  seven modules, round-robin; loramux with the adapters and with none.
- peft / hf: transformers + PEFT mixed batch (`adapter_names`) and transformers `generate` base only, batches of 32
  (bitsandbytes NF4 base). Measured on `--baseline-batches` batches of `--baseline-gen` tokens: a rate in tokens/s.
- stream: 1 request, 128 prompt tokens, 512 generated.
- w2: distinct adapters of ranks 8 to 64 on q_proj and v_proj, Zipf popularity (exponent 1), Poisson arrivals at a
  rate above what the engine serves, 64 slots (the memory of 64 rank-64 adapters, paged by rank 8: it holds more
  adapters of lower rank) and a CPU cache of 256 adapters: tokens/s, time to first token.
- load: time to move a rank-16 all-module adapter from the CPU cache into a slot, and from disk into a slot.

Peak GPU memory is that of the loramux parts. With `--repeats N`, W1 (with and without adapters, in turn) and W2
(each time on a fresh engine) run N times and the run with the median tokens/s stands for each; every run's figure
is kept. A table goes to stdout, all figures to `--json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loramux.adapters.source import AdapterNotFoundError, AdapterRef, ResolvedAdapter
from loramux.adapters.weights import base_shapes, load_lora
from loramux.server.engine import adapter_cache
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.engine.request import SamplingParams
from loramux.server.layers import attention
from loramux.server.models.config import ModelConfig
from loramux.server.models.llama import LINEAR_MODULES, LlamaForCausalLM
from loramux.server.models.loader import BaseModel, compute_dtype_for

CPU_THREADS = torch.get_num_threads()  # torch's intra-op threads at start, before any fetch thread changed the default
PARTS = ("w1", "peft", "hf", "stream", "w2", "load")
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
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


class CharTokenizer:
    """Token id -> one printable character: detokenizing costs about what a real tokenizer's decode does per id,
    without a 128k-entry vocabulary to build."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(33 + i % 90) for i in ids)


def build_base(raw: dict, device: torch.device) -> BaseModel:
    config = ModelConfig(**raw)
    dtype = compute_dtype_for(device)
    model = LlamaForCausalLM(config, RandomWeights(config, device, dtype), dtype).to(device).eval()
    return BaseModel("random", Path("."), config, model, CharTokenizer())


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
            group = "self_attn" if module in LINEAR_MODULES[:4] else "mlp"
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


class StepPhases:
    """Host seconds of the phases of each engine step: scheduling, sampling (which waits for the device to finish the
    step's forward) and, measured by the caller, the forward until it returned; the rest of a step is the queued
    adds, the chunks and appending and streaming the tokens. Installed on one engine until `remove`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.current = {"schedule": 0.0, "sample": 0.0}
        schedule, sample = engine.scheduler.schedule, engine.sampler.sample

        def timed_schedule():
            begun = time.perf_counter()
            try:
                return schedule()
            finally:
                self.current["schedule"] += time.perf_counter() - begun

        def timed_sample(*args, **kwargs):
            begun = time.perf_counter()
            try:
                return sample(*args, **kwargs)
            finally:
                self.current["sample"] += time.perf_counter() - begun

        engine.scheduler.schedule = timed_schedule  # type: ignore[method-assign]
        engine.sampler.sample = timed_sample  # type: ignore[method-assign]

    def take(self) -> dict[str, float]:
        """The phases since the last call, and start again."""
        taken, self.current = self.current, {"schedule": 0.0, "sample": 0.0}
        return taken

    def remove(self) -> None:
        del self.engine.scheduler.schedule
        del self.engine.sampler.sample


def phase_medians(steps: list[dict]) -> dict[str, float | None]:
    """Median milliseconds of each phase over `steps` (dicts of *_ms figures)."""
    keys = ("ms", "schedule_ms", "forward_host_ms", "forward_gpu_ms", "sample_ms", "rest_ms")
    return {k: statistics.median(x[k] for x in steps) if steps and steps[0].get(k) is not None else None for k in keys}


def run_batch(engine: LLMEngine, ids: list[list[int]], gen: int, adapters: list[str | None]) -> dict:
    """Submit all at once, run to completion: generated tokens/s over the wall time."""
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    steps: list[tuple[float, bool]] = []  # (seconds, decode tokens only) of every step that ran
    decode_phases: list[dict] = []  # host milliseconds by phase of each decode step
    run_chunks, decode_only, forward = engine.runner.run, [False], [0.0]

    def run(chunks):
        decode_only[0] = all(len(c.token_ids) == 1 for c in chunks)
        begun = time.perf_counter()
        try:
            return run_chunks(chunks)
        finally:
            forward[0] = time.perf_counter() - begun

    def step() -> bool:
        phases.take()
        begun = time.perf_counter()
        worked = LLMEngine.step(engine)
        if worked:
            wall = time.perf_counter() - begun
            steps.append((wall, decode_only[0]))
            if decode_only[0]:
                taken = phases.take()
                rest = wall - forward[0] - taken["schedule"] - taken["sample"]
                decode_phases.append({"ms": 1e3 * wall, "schedule_ms": 1e3 * taken["schedule"],
                                      "forward_host_ms": 1e3 * forward[0], "sample_ms": 1e3 * taken["sample"],
                                      "rest_ms": 1e3 * rest})  # fmt: skip
        return worked

    engine.runner.run, engine.step = run, step  # type: ignore[method-assign]
    phases = StepPhases(engine)
    try:
        sync(engine.base.device)
        started = time.perf_counter()
        outs = engine.generate(ids, params, adapters=adapters)
        sync(engine.base.device)
        seconds = time.perf_counter() - started
    finally:
        phases.remove()
        del engine.runner.run, engine.step  # back to the class's methods
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == gen * len(ids), f"generated {tokens} tokens, expected {gen * len(ids)}"
    print(f"  {len(ids)} requests x {gen} tokens: {tokens / seconds:.1f} tokens/s", flush=True)
    decode = [t for t, d in steps if d]
    return {"requests": len(ids), "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steps": len(steps), "decode_steps": len(decode),
            "decode_step_ms_median": 1e3 * statistics.median(decode) if decode else None,
            "decode_phase_ms_median": phase_medians(decode_phases),
            "decode_seconds": sum(decode), "other_step_seconds": sum(t for t, d in steps if not d),
            "other_step_ms": [round(1e3 * t, 1) for t, d in steps if not d],
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


def bench_w1(base: BaseModel, args, root: Path, results: dict) -> None:
    n, plen, gen = args.w1_requests, args.prompt, args.gen
    source = LocalSource()
    modules = list(LINEAR_MODULES)
    # 32 distinct adapters (names, cache entries, slots); their weights files are 4 distinct ones, linked, since
    # speed does not depend on the values and writing 32 x 84 MB of random weights would dominate the run
    for i in range(args.w1_adapters):
        if i < 4:
            path = write_adapter(root / f"w1-{i}", 16, modules, base.config, seed=i)
        else:
            path = alias_adapter(root, f"w1-{i}", root / f"w1-{i % 4}")
        source.add(f"bench/w1-{i}", path)
    blocks = n * math.ceil((plen + gen) / 16) + 64
    config = EngineConfig(
        num_slots=args.w1_adapters, max_lora_rank=16, num_kv_blocks=blocks, max_num_seqs=n,
        max_num_batched_tokens=args.max_batched_tokens, max_queue=4 * n,
        adapter_cache_bytes=16 * 2**30,  # all 32 (84 MB each, bf16 in pinned memory) stay cached
    )  # fmt: skip
    ids = prompts(n, plen, base.config.vocab_size, seed=1)
    names = [f"bench/w1-{i % args.w1_adapters}" for i in range(n)]
    if args.compare_attention:  # first with decode attention through the padded gather (the path before the kernel)
        attention.TRITON_DECODE = False
        engine = LLMEngine(base, source, config)
        try:
            engine.warm_up()
            run_batch(engine, ids, min(gen, 8), names)
            results["w1_lora_gather"] = run_batch(engine, ids, gen, names)
            results["w1_base_gather"] = run_batch(engine, ids, gen, [None] * n)
        finally:
            attention.TRITON_DECODE = True
            engine.shutdown()
            gc.collect()
    engine = LLMEngine(base, source, config)
    try:
        # warm-up: every decode graph, the slots filled, the kernels compiled
        engine.warm_up()
        run_batch(engine, ids, min(gen, 8), names)
        run_batch(engine, ids, min(gen, 8), [None] * n)
        lora_runs, base_runs, at_once_runs = [], [], []
        overlap = engine.overlap_outputs
        for _ in range(args.repeats):  # in turn, so that a slow spell of the machine meets both
            lora_runs.append(run_batch(engine, ids, gen, names))
            base_runs.append(run_batch(engine, ids, gen, [None] * n))
            if args.compare_overlap:  # the same engine streaming each step's outputs before the next step
                engine.overlap_outputs = False
                at_once_runs.append(run_batch(engine, ids, gen, names))
                engine.overlap_outputs = overlap
        results["w1_lora"], results["w1_base"] = median_run(lora_runs), median_run(base_runs)
        if at_once_runs:
            results["w1_lora_at_once"] = median_run(at_once_runs)
        if "stream" in args.parts:
            one = prompts(1, plen, base.config.vocab_size, seed=2)
            run_batch(engine, one, 8, [names[0]])
            results["stream"] = run_batch(engine, one, args.stream_gen, [names[0]])
            results["stream_base"] = run_batch(engine, one, args.stream_gen, [None])
        if "load" in args.parts:
            results["load"] = bench_load(engine, root / "w1-0", base)
        if args.profile and base.device.type == "cuda":
            results["decode_profile"] = profile_decode(engine, ids, names)
            results["decode_profile_base"] = profile_decode(engine, ids, [None] * n)
    finally:
        engine.shutdown()
        gc.collect()


def bench_load(engine: LLMEngine, adapter_dir: Path, base: BaseModel) -> dict:
    """A rank-16 all-module adapter into slot 0: from the CPU cache (weights already read) and from disk.

    The CPU cache holds what the engine's fetch reads: the slots' dtype, in a region of the page-locked arena; the
    same write from the fp32 pageable tensors `load_lora` returns by default is timed too. From disk: read on this
    thread (`load_lora`), and, where the engine has reader processes, read by one of them as the engine does."""
    device = base.device
    runner, arena, readers = engine.runner, engine.adapters.arena, engine.adapters.readers
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
            adapter_dir, base.config, runner.adapter_dtype, lambda n, take=take: take(n)[1],
            b_rank_major=runner.cache_b_rank_major,
        )  # fmt: skip
        runner.write_slot(0, weights)
        sync(device)
        disk.append(time.perf_counter() - started)
        started = time.perf_counter()
        runner.write_slot(0, weights)
        sync(device)
        cpu.append(time.perf_counter() - started)
        raw = load_lora(adapter_dir, base.config)
        started = time.perf_counter()
        runner.write_slot(0, raw)
        sync(device)
        cpu_fp32.append(time.perf_counter() - started)
        for offset in regions:
            arena.free(offset)
        if readers is not None:
            taken: list[int] = []
            started = time.perf_counter()
            runner.write_slot(0, readers.read(adapter_dir, taking(taken)))
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
    from torch.profiler import ProfilerActivity, profile

    runner, graphs = engine.runner, engine.runner.graphs
    engine.runner.graphs = None  # eager, so that the profiler sees every kernel
    engine.runner.graph_prompts = False
    walls: dict[int, float] = {}  # wall seconds of the profiled runs, by tokens generated

    def by_kernel(max_tokens: int) -> dict[str, float]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        begun = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(ids, params, adapters=names)
        walls[max_tokens] = time.perf_counter() - begun
        return {e.key: getattr(e, "device_time_total", 0.0) for e in prof.key_averages()}

    def by_kind(kernels: dict[str, float]) -> dict[str, float]:
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

    try:
        # the prefill steps are the same in both runs: the difference is 4 decode steps of the whole batch
        one, five = by_kernel(1), by_kernel(5)
    finally:
        runner.graphs, runner.graph_prompts = graphs, True
    step = {k: (five.get(k, 0.0) - one.get(k, 0.0)) / 4 for k in five.keys() | one.keys()}
    kinds = by_kind(step)
    total = sum(kinds.values())
    top = dict(sorted(step.items(), key=lambda kv: -kv[1])[:25])
    return {
        "note": "one eager decode step of the W1 batch: GPU microseconds by kind, and the top kernels; then the "
                "prefill of the whole batch (the run of 1 token: its prefill steps and one sampling)",
        "us": kinds, "share": {k: v / total for k, v in kinds.items()} if total else {}, "top_kernels_us": top,
        "wall_s": walls, "prefill_us": by_kind(one),
        "prefill_top_kernels_us": dict(sorted(one.items(), key=lambda kv: -kv[1])[:25]),
    }  # fmt: skip


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


SERIES_FIELDS = ("ms", "kind", "decode_tokens", "prompt_tokens", "running", "waiting", "schedule_ms", "forward_host_ms",
                 "forward_cpu_ms", "others_cpu_ms", "forward_gpu_ms", "sample_ms", "rest_ms")  # fmt: skip

W2_VARIANTS = {  # --w2-variants: engine settings W2 is also run with, each beside the default
    "no_split": {"split_mixed": False},  # mixed steps in one pass (piecewise graphs), not a decode graph + prompt pass
    "wave": {"prefill_wave": 16, "max_prefill_delay": 8},  # admissions grouped in waves
    "slots128": {"num_slots": 128},  # twice the slots: what more resident adapters would give
    "gather": {"triton_decode": False},  # decode attention through the padded gather + SDPA
    "at_once": {"overlap_outputs": False},  # each step's outputs streamed before the next step (not during it)
    "unpaged": {"slot_page_rank": 64},  # one adapter per slot whatever its rank (slot memory not paged by rank)
    "repeat": {},  # the same again: what is left of first-time costs (compiles, allocations) shows as a difference
    "warm": {"cpu_cache_warm": True},  # every adapter W2 asks for read into the CPU cache before the clock starts
    "fetch_all_cores": {"fetch_cpu_threads": "all"},  # the fetch threads' torch calls on every core (torch's default)
    "fetch1": {"fetch_threads": 1},  # adapters read one at a time
    "fetch4": {"fetch_threads": 4},  # four read at once
    "switch": {"switch_interval": 0.0002},  # a thread waiting for the GIL gets it after 0.2 ms instead of 5
    "switch20": {"switch_interval": 0.02},  # ... after 20 ms: the step loop's Python runs on, the readers wait
    "switch50": {"switch_interval": 0.05},
    "eager_prompts": {"graph_prompts": False},  # passes over prompt chunks launched kernel by kernel (no graphs)
    "any_sdpa": {"sdpa_backends": None},  # the prompts' attention on torch's choice of backend (cuDNN's included)
    "rate200": {"rate": 200.0},  # arrivals twice as fast
    "rate400": {"rate": 400.0},
    "burst": {"rate": math.inf},  # every request submitted at the start
    "unfenced": {"fence": False},  # each slot write waits for all the work queued on the step stream (as before)
    "in_process": {"adapter_reader_processes": 0},  # adapters read on the fetch threads, beside the step loop (before)
    "loader_thread": {"step_thread_slot_writes": False},  # slot writes on a loader thread beside the step loop (before)
}


def bench_w2(
    base: BaseModel, args, root: Path, results: dict, variant: str | None = None, profile: bool = False
) -> None:
    """Many adapters, Zipf popularity, Poisson arrivals above the serving rate: tokens/s and TTFT percentiles."""
    changes = dict(W2_VARIANTS[variant]) if variant else {}
    split_mixed = changes.pop("split_mixed", True)
    cpu_cache_warm = changes.pop("cpu_cache_warm", False)
    fetch_cpu_threads = changes.pop("fetch_cpu_threads", None)
    fetch_threads = changes.pop("fetch_threads", adapter_cache.FETCH_THREADS)
    switch_interval = changes.pop("switch_interval", sys.getswitchinterval())
    graph_prompts = changes.pop("graph_prompts", True)
    fenced = changes.pop("fence", True)
    rate = changes.pop("rate", args.w2_rate)  # requests/s, above what W1 sustains (W1 tokens/s / gen)
    default_backends = attention.SDPA_BACKENDS
    attention.SDPA_BACKENDS = changes.pop("sdpa_backends", default_backends)
    attention.TRITON_DECODE = changes.pop("triton_decode", True)
    rng = random.Random(3)
    ranks = (8, 16, 32, 64)
    modules = ["q_proj", "v_proj"]
    shared = {r: write_adapter(root / f"w2-rank{r}", r, modules, base.config, seed=100 + r) for r in ranks}
    source = LocalSource()
    for i in range(args.w2_adapters):
        source.add(f"bench/w2-{i}", alias_adapter(root / "w2", f"a{i}", shared[ranks[i % len(ranks)]]))
    dtype = compute_dtype_for(base.device)  # the CPU cache holds adapters in the slots' dtype
    per_adapter = {r: load_lora(shared[r], dtype=dtype).nbytes() for r in ranks}
    cache_bytes = int(args.w2_cpu_cache * statistics.mean(per_adapter.values()))
    n, plen, gen = args.w2_requests, args.prompt, args.gen
    blocks = args.w1_requests * math.ceil((plen + gen) / 16) + 64
    settings = dict(
        num_slots=args.w2_slots, max_lora_rank=64, num_kv_blocks=blocks, max_num_seqs=args.w1_requests,
        max_num_batched_tokens=args.max_batched_tokens, max_queue=4 * n, adapter_cache_bytes=cache_bytes,
    )  # fmt: skip
    config = EngineConfig(**(settings | changes))
    weights = [1.0 / (k + 1) for k in range(args.w2_adapters)]  # Zipf, exponent 1
    chosen = rng.choices(range(args.w2_adapters), weights=weights, k=n)
    ids = prompts(n, plen, base.config.vocab_size, seed=4)
    gc_seconds, gc_began = [0.0], [0.0]

    def on_gc(phase: str, info: dict) -> None:  # time spent in Python's garbage collector during the run
        if phase == "start":
            gc_began[0] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_began[0]

    gc.callbacks.append(on_gc)
    default_switch_interval = sys.getswitchinterval()
    default_fetch_threads, adapter_cache.FETCH_THREADS = adapter_cache.FETCH_THREADS, fetch_threads
    try:
        engine = LLMEngine(base, source, config)
    finally:
        adapter_cache.FETCH_THREADS = default_fetch_threads
    engine.runner.split_mixed = split_mixed
    if not fenced:
        engine.adapters.fence = lambda: None
    engine.runner.graph_prompts = graph_prompts
    if fetch_cpu_threads == "all":  # set explicitly: a thread starts with the count the last fetch thread set
        engine.adapters.fetch_cpu_threads = CPU_THREADS
    first: dict[int, float] = {}
    submitted: dict[int, float] = {}
    done = threading.Event()
    remaining = [n]
    lock = threading.Lock()
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    try:
        sys.setswitchinterval(switch_interval)  # given back in `finally` below
        engine.warm_up()
        run_batch(engine, ids[:4], 4, [f"bench/w2-{k}" for k in range(4)])  # warm-up
        if cpu_cache_warm:  # the least popular first, so that the most popular are the last evicted if any are
            for k in sorted(set(chosen), reverse=True):
                engine.adapters.fetch(AdapterRef.parse(f"bench/w2-{k}"), None)
        arrivals, t = [], 0.0
        for _ in range(n):
            t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
            arrivals.append(t)

        def on_output(i: int, out) -> None:
            if isinstance(out, BaseException):
                raise out
            first.setdefault(i, time.perf_counter())
            if out.finish_reason is not None:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        started = time.perf_counter()

        def submit() -> None:
            for i, at in enumerate(arrivals):
                delay = started + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                submitted[i] = time.perf_counter()
                engine.add(engine.make_request(lambda o, i=i: on_output(i, o), prompt_ids=ids[i],
                                               adapter=f"bench/w2-{chosen[i]}", params=params))  # fmt: skip

        feeder = threading.Thread(target=submit, daemon=True)
        feeder.start()
        running: list[int] = []  # requests in each step's batch
        kinds: dict[str, list[float]] = {"decode": [], "mixed": [], "prefill": []}  # step walls by kind
        run_chunks, kind = engine.runner.run, ["decode"]

        shapes: list[tuple[int, int, int]] = []  # each step's (decode tokens, prompt tokens, distinct slots)
        # each step's forward: host seconds until it returned, its CUDA events (GPU time, read after the run), the
        # adapter reads and slot writes under way when it began (what competes with the step thread for the GIL), and
        # the step thread's CPU time in it (host seconds well above it: the thread waited, for the GIL or a core), and
        # the CPU time of this process's other threads meanwhile (on a GPU the fetch and loader threads, who compete
        # for the GIL; on the CPU torch's own worker threads too)
        forwards: list[tuple[float, tuple | None, int, int, float, float]] = []
        cache = engine.adapters

        def run(chunks):
            decode = sum(len(c.token_ids) == 1 for c in chunks)
            kind[0] = "decode" if decode == len(chunks) else "mixed" if decode else "prefill"
            shapes.append((decode, sum(len(c.token_ids) for c in chunks) - decode, len({c.slot for c in chunks})))
            reads = len(cache._reading)
            writes = cache._loader._work_queue.qsize() + cache.writes_pending()  # on the loader thread, or the step's
            events = None
            if base.device.type == "cuda":
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            begun, cpu_begun, process_begun = time.perf_counter(), time.thread_time(), time.process_time()
            out = run_chunks(chunks)
            host, cpu = time.perf_counter() - begun, time.thread_time() - cpu_begun
            others = time.process_time() - process_begun - cpu  # this process's other threads (fetch, loader, ...)
            if events is not None:
                events[1].record()
            forwards.append((host, events, reads, writes, cpu, others))
            return out

        engine.runner.run = run  # type: ignore[method-assign]
        phases = StepPhases(engine)
        walls: list[tuple] = []
        queued: list[int] = []  # requests waiting after each step's scheduling (0: the engine ran all it had)
        compiled = triton_variants()
        gc_seconds[0] = 0.0
        try:
            while not done.is_set():
                phases.take()
                begun = time.perf_counter()
                ran = len(forwards)
                if engine.step():
                    if len(forwards) == ran:  # a step that only streamed the last step's outputs (overlap_outputs)
                        continue
                    kinds[kind[0]].append(time.perf_counter() - begun)
                    walls.append((time.perf_counter() - begun, kind[0], *shapes[-1], phases.take()))
                    running.append(len(engine.scheduler.running))
                    queued.append(engine.scheduler.num_waiting)
                else:
                    engine.wait_for_work(0.01)
            seconds = time.perf_counter() - started
        finally:
            phases.remove()
        sync(base.device)
        gpu_ms = [ev[0].elapsed_time(ev[1]) if ev is not None else None for _, ev, *_ in forwards]
        steps_detail = [
            {"ms": round(1e3 * w, 1), "kind": k, "decode_tokens": d, "prompt_tokens": p, "slots": s,
             "schedule_ms": round(1e3 * ph["schedule"], 2), "forward_host_ms": round(1e3 * f[0], 1),
             "forward_cpu_ms": round(1e3 * f[4], 1), "others_cpu_ms": round(1e3 * f[5], 1),
             "forward_gpu_ms": None if g is None else round(g, 1),
             "sample_ms": round(1e3 * ph["sample"], 2),
             "rest_ms": round(1e3 * (w - f[0] - ph["schedule"] - ph["sample"]), 2),
             "reads_under_way": f[2], "slot_writes_queued": f[3], "running": r, "waiting": q}
            for (w, k, d, p, s, ph), f, g, r, q in zip(walls, forwards, gpu_ms, running, queued, strict=True)
        ]  # fmt: skip
        # the engine is saturated while requests wait (it runs a full batch, or waits for their adapters' slots)
        saturated = sum(x["ms"] for x in steps_detail if x["waiting"] > 0 or x["running"] >= config.max_num_seqs)
        full_at = next((i for i, x in enumerate(steps_detail) if x["running"] >= config.max_num_seqs), None)
        ttft = sorted(first[i] - submitted[i] for i in range(n))
        key = f"w2_{variant}" if variant else "w2"
        results[key] = {
            "requests": n, "adapters": args.w2_adapters, "distinct_used": len(set(chosen)), "slots": args.w2_slots,
            "cpu_cache_adapters": args.w2_cpu_cache, "arrival_rate_per_s": rate, "seconds": seconds,
            "tokens_per_s": n * gen / seconds, "ttft_p50_s": ttft[len(ttft) // 2],
            "saturated_seconds": saturated / 1e3,
            "first_full_batch_s": None if full_at is None else sum(x["ms"] for x in steps_detail[:full_at]) / 1e3,
            "phase_ms_median": {k: phase_medians([x for x in steps_detail if x["kind"] == k]) for k in kinds},
            "ttft_p99_s": ttft[min(n - 1, int(0.99 * n))], "steps": len(running),
            "running_mean": statistics.mean(running), "settings": W2_VARIANTS[variant] if variant else {},
            "steps_by_kind": {k: {"steps": len(v), "seconds": sum(v),
                                  "ms_median": 1e3 * statistics.median(v) if v else None} for k, v in kinds.items()},
            "slowest_steps_ms": {k: sorted((round(1e3 * t, 1) for t in v), reverse=True)[:8] for k, v in kinds.items()},
            "gc_seconds": gc_seconds[0], "stats": engine.stats(),
            "triton_variants_compiled": triton_variants() - compiled,
            "slowest_steps": sorted(steps_detail, key=lambda x: -x["ms"])[:12],
            "steps_with_prompts": [x for x in steps_detail if x["kind"] != "decode"],
            "step_series_fields": list(SERIES_FIELDS),  # every step, compactly, in order
            "step_series": [[x[f] for f in SERIES_FIELDS] for x in steps_detail],
            "forward_seconds_by_kind": {
                k: {"host": sum(x["forward_host_ms"] for x in steps_detail if x["kind"] == k) / 1e3,
                    "gpu": sum(x["forward_gpu_ms"] or 0 for x in steps_detail if x["kind"] == k) / 1e3}
                for k in kinds},
        }  # fmt: skip
        print(f"  W2{' ' + variant if variant else ''}: {results[key]['tokens_per_s']:.1f} tokens/s", flush=True)
        if profile and base.device.type == "cuda":
            # a decode step of a W1-sized batch, round-robin over the adapters W2 left resident (its ranks, q/v modules)
            resident = sorted(k.split("@")[0] for k in engine.adapters.resident())
            names = [resident[i % len(resident)] for i in range(args.w1_requests)]
            engine.runner.run = run_chunks  # type: ignore[method-assign]
            results[key]["decode_profile"] = profile_decode(engine, ids[: args.w1_requests], names)
            results[key]["decode_profile"]["adapters"] = len(resident)
    finally:
        attention.TRITON_DECODE = True
        attention.SDPA_BACKENDS = default_backends
        sys.setswitchinterval(default_switch_interval)
        gc.callbacks.remove(on_gc)
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
    rows = [
        ("loramux W1, 32 adapters", "w1_lora"),
        ("loramux W1, no adapters", "w1_base"),
        ("transformers + PEFT mixed batch (32)", "peft_mixed"),
        ("transformers generate base only (32)", "hf_base"),
        ("loramux one stream (adapter)", "stream"),
        ("loramux one stream (base)", "stream_base"),
        ("loramux W2 (Zipf, Poisson)", "w2"),
        ("W1, 32 adapters, gather attention", "w1_lora_gather"),
        ("W1, no adapters, gather attention", "w1_base_gather"),
        ("W1, 32 adapters, outputs streamed at once", "w1_lora_at_once"),
    ]
    rows += [
        (f"loramux W2, {key[3:]}", key) for key in results if key.startswith("w2_") and "tokens_per_s" in results[key]
    ]
    lines = [f"{'system':44} {'tokens/s':>10}", "-" * 56]
    for label, key in rows:
        if key in results:
            lines.append(f"{label:44} {results[key]['tokens_per_s']:10.1f}")
    if "w1_lora" in results and "w1_base" in results:
        ratio = results["w1_lora"]["tokens_per_s"] / results["w1_base"]["tokens_per_s"]
        lines.append(f"{'W1 adapters / no adapters':44} {ratio:10.3f}")
    if "w2" in results:
        w2 = results["w2"]
        if "w1_lora" in results:
            lines.append(
                f"{'W2 / W1 (with adapters)':44} {w2['tokens_per_s'] / results['w1_lora']['tokens_per_s']:10.3f}"
            )
        lines.append(f"{'W2 TTFT p50 / p99 (s)':44} {w2['ttft_p50_s']:.3f} / {w2['ttft_p99_s']:.3f}")
    for key, label in (("w1_lora", "W1 with adapters"), ("w1_base", "W1 without"), ("w2", "W2")):
        if "runs" in results.get(key, {}):
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[key]["runs"])
            lines.append(f"{label + ', each run (the median above)':44} {each}")
    if "load" in results:
        ld = results["load"]
        label = "adapter -> slot: CPU cache / disk (ms)"
        lines.append(f"{label:44} {ld['cpu_to_slot_ms']:.1f} / {ld['disk_to_slot_ms']:.1f}")
        if ld.get("disk_to_slot_via_reader_ms") is not None:
            label = "adapter -> slot: disk via a reader process (ms)"
            lines.append(f"{label:44} {ld['disk_to_slot_via_reader_ms']:.1f}")
        label = "adapter -> slot from fp32 pageable (ms)"
        lines.append(f"{label:44} {ld['cpu_fp32_pageable_to_slot_ms']:.1f}")
    if "peak_gpu_memory_gib" in results:
        lines.append(f"{'peak GPU memory, loramux (GiB)':44} {results['peak_gpu_memory_gib']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test, any device)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--w1-requests", type=int, default=256)
    p.add_argument("--w1-adapters", type=int, default=32)
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
    p.add_argument("--w2-variants", default="", help=f"W2 again with other settings: of {','.join(W2_VARIANTS)}")
    p.add_argument(
        "--compare-attention",
        action="store_true",
        help="W1 also with decode attention through the padded gather (the path before the kernel)",
    )
    p.add_argument(
        "--compare-overlap",
        action="store_true",
        help="W1 with adapters also with each step's outputs streamed before the next step (overlap_outputs off)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="W1 and W2 this many times each (W2 on a fresh engine): medians"
    )
    p.add_argument("--profile", action="store_true", help="profile a decode step of W1, and of W2's adapters (GPU)")
    p.add_argument(
        "--expand-programs-per-sm",
        type=int,
        help="the segment expand's programs per multiprocessor (lora_kernels.EXPAND_PROGRAMS_PER_SM; 0: one per plan "
        "row, as before the cap)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.w1_requests, args.w1_adapters, args.prompt, args.gen = 8, 4, 8, 4
        args.stream_gen, args.baseline_gen, args.max_batched_tokens = 8, 4, 64
        # W2's requests all but at once: a tiny step takes a few ms, and at 200/s a fast CPU never queued any
        args.w2_requests, args.w2_adapters, args.w2_slots, args.w2_cpu_cache, args.w2_rate = 12, 10, 3, 5, 5000.0
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.parts = [x for x in args.only.split(",") if x]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    wrong = {x for x in args.w2_variants.split(",") if x} - set(W2_VARIANTS)
    if wrong:
        p.error(f"unknown W2 variants {sorted(wrong)}; choose from {','.join(W2_VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.expand_programs_per_sm is not None:
        from loramux.server.layers import lora_kernels

        lora_kernels.EXPAND_PROGRAMS_PER_SM = args.expand_programs_per_sm
    raw = TINY if args.tiny else LLAMA3_8B
    results: dict = {
        "command": " ".join(["python", "loadtests/bench_engine.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(), "model": raw,
    }  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
            run_parts(raw, args, device, Path(tmp), results)
    finally:  # what was measured is kept even when a later part fails
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def run_parts(raw: dict, args: argparse.Namespace, device: torch.device, root: Path, results: dict) -> None:
    """loramux's W1, one stream and load times, then the baselines (while loramux's model stays resident), then W2."""
    cuda = device.type == "cuda"
    base = None
    if any(part in args.parts for part in ("w1", "stream", "load", "w2")):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        base = build_base(raw, device)
        print(f"built the model in {time.perf_counter() - started:.1f}s", flush=True)
        results["build_seconds"] = time.perf_counter() - started
        if any(part in args.parts for part in ("w1", "stream", "load")):
            bench_w1(base, args, root, results)
            if cuda:
                results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if "peft" in args.parts or "hf" in args.parts:
        bench_baselines(raw, args, device, results)
        if cuda:
            torch.cuda.empty_cache()
    if "w2" in args.parts:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        runs: list[dict] = []
        for i in range(args.repeats):  # each on a fresh engine: cold caches, as the first
            got: dict = {}
            bench_w2(base, args, root / f"w2-default-{i}", got, profile=args.profile and i == 0)
            runs.append(got["w2"])
            if cuda and i == 0:
                results["peak_gpu_memory_w2_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if cuda:
                torch.cuda.empty_cache()
        results["w2"] = median_run(runs)
        for variant in filter(None, args.w2_variants.split(",")):
            if cuda:
                torch.cuda.empty_cache()
            bench_w2(base, args, root / f"w2-{variant}", results, variant)


if __name__ == "__main__":
    raise SystemExit(main())
