"""The benchmark of record: loramux as users meet it, through `loramux serve` with a real tokenizer, the sampling
settings users send and the load generator over HTTP, with the engine alone measured in the same run beside it.

    python loadtests/bench_serve.py                      # on a GPU: the Llama-3-8B shape
    python loadtests/bench_serve.py --tiny               # on the CPU: a tiny model (CI runs a short one)

1. Writes a checkpoint of random weights of the shape (Llama-3-8B by default) with the default model's tokenizer
   (SmolLM2's; its vocabulary extended with plain tokens up to the shape's, so that every sampled id is text).
2. Starts `loramux serve --base CKPT` as a process of its own, as a user would.
3. Pushes the adapters: W1's 32 rank-16 all-module adapters with `adapters push`, one command each; W2's 1,000
   adapters (ranks 8 to 64 on q_proj and v_proj) through the same push function, from a pool of processes.
4. Warms the server up (every adapter once; then a W1 batch of 4-token requests with the adapters and one without,
   whose figures are kept as the fresh server's, `cold`), then drives `python -m loadtests.loadgen` for each
   workload: W1 (256 streaming completions of about 100 prompt and exactly 128 generated tokens, 256 in flight, the
   32 adapters) with a sampling mix like real traffic (45% the server's default temperature, 25% top_p 0.9, 20%
   greedy, 10% seeded) and greedy alone; the same without adapters; W2 (512 requests over the 1,000 adapters, Zipf
   popularity, Poisson arrivals at 100/s, the mix); one stream (512 tokens, the server's default sampling, and
   greedy).
5. Runs the engine alone on the same checkpoint and engine settings, before the server starts
   (`bench_engine.py --base CKPT`: W1 with adapters and without, one stream; greedy and with the mix).
6. Prints a table and writes one JSON with every figure and the ratios (HTTP / engine, adapters / none, W2 / W1,
   TPOT / the engine's median decode step), by default a new dated file under loadtests/results/.

With `--tiny` (the CPU): a 2-layer model of hidden size 64 with the real tokenizer (so the model's own compute is
negligible and the host's work is what is measured), 128 requests of 64 tokens at 128 in flight, at temperature 0
and 1.0, without adapters and with 4; the engine alone at both temperatures.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.record import REPO, dated_json_path, help_text, run_header, workdir
from loadtests.shapes import LLAMA3_8B
from loramux.core.model_config import ATTENTION_MODULES, LINEAR_MODULES

SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "tiny": {
        "vocab_size": 49152,  # the tokenizer's own
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
    },
}


# -- the checkpoint ----------------------------------------------------------------------------------------------


def write_checkpoint(directory: Path, shape: dict, tokenizer_dir: Path, device: str) -> Path:
    """A Llama checkpoint of random weights (bf16, normal(0, 0.02), one safetensors file per layer) with the
    tokenizer of `tokenizer_dir`, its vocabulary grown to the shape's with plain tokens."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **shape,
    }  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    size = max([*vocab.values(), *(t["id"] for t in tokenizer.get("added_tokens", []))]) + 1
    for token_id in range(size, shape["vocab_size"]):
        vocab[f"tok{token_id}"] = token_id  # decodable, never produced by encoding (no merges reach it)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    config["eos_token_id"] = special.get("<|im_end|>", special.get("<|endoftext|>", 2))
    config["bos_token_id"] = special.get("<|im_start|>", 1)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator(device).manual_seed(0)

    def random(*size: int) -> torch.Tensor:
        w = torch.empty(size, device=device, dtype=torch.bfloat16)
        return w.normal_(0.0, 0.02, generator=generator).cpu()

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    save_file({"model.embed_tokens.weight": random(shape["vocab_size"], h), "model.norm.weight": torch.ones(h,
              dtype=torch.bfloat16), "lm_head.weight": random(shape["vocab_size"], h)},
              str(directory / "model-outer.safetensors"), metadata={"format": "pt"})  # fmt: skip
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors = {
            p + "self_attn.q_proj.weight": random(heads * head_dim, h),
            p + "self_attn.k_proj.weight": random(kv * head_dim, h),
            p + "self_attn.v_proj.weight": random(kv * head_dim, h),
            p + "self_attn.o_proj.weight": random(h, heads * head_dim),
            p + "mlp.gate_proj.weight": random(inter, h),
            p + "mlp.up_proj.weight": random(inter, h),
            p + "mlp.down_proj.weight": random(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
        save_file(tensors, str(directory / f"model-layer{layer:03d}.safetensors"), metadata={"format": "pt"})
    return directory


def module_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (inter, h),
            "up_proj": (inter, h), "down_proj": (h, inter)}  # fmt: skip


def write_adapter(directory: Path, shape: dict, rank: int, modules: list[str], seed: int) -> Path:
    """A PEFT LoRA adapter directory with random A and B (bf16) on `modules` of every layer."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    shapes = module_shapes(shape)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for module in modules:
            out, inp = shapes[module]
            group = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a = rng.normal(0, 0.01, (rank, inp)).astype(np.float32)
            b = rng.normal(0, 0.01, (out, rank)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(a).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(b).bfloat16()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": modules, "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


# -- the server and the adapters ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, home: Path, server_args: list[str], env: dict[str, str]) -> tuple:
    """`loramux serve --base CKPT ...` on a free port; waits for /ready -> (process, url, log path, seconds)."""
    import httpx

    port = free_port()
    log = home / f"serve-{port}.log"
    command = [sys.executable, "-m", "loramux.cli", "--log-level", "INFO", "serve", "--base", str(checkpoint),
               "--port", str(port), "--data-dir", str(home / "data"), *server_args]  # fmt: skip
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"loramux serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url, log, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def push_with_cli(entries: list[tuple[Path, str]], url: str, env: dict[str, str]) -> None:
    """`adapters push DIR NS/NAME --hub URL`, as a user types it, a few at once."""
    adapters = Path(sys.executable).parent / "adapters"
    command = [str(adapters)] if adapters.exists() else [sys.executable, "-m", "loramux.adapters.cli"]

    def one(entry: tuple[Path, str]) -> None:
        directory, name = entry
        done = subprocess.run([*command, "push", str(directory), name, "--hub", url], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"adapters push {name} failed: {done.stderr.strip()}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, entries))


def _push_share(entries: list[tuple[str, str]], url: str) -> None:
    from loramux.registry.client import push

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda e: push(Path(e[0]), e[1], url, None, False, "Upload adapter"), entries))


def push_many(entries: list[tuple[Path, str]], url: str, processes: int = 8) -> None:
    """The push of `adapters push` (validation, upload, commit) for many adapters, from a pool of processes."""
    ctx = multiprocessing.get_context("spawn")
    shares = [[(str(d), n) for d, n in entries[i::processes]] for i in range(processes)]
    with ctx.Pool(processes) as pool:
        pool.starmap(_push_share, [(share, url) for share in shares if share])


# -- the load ----------------------------------------------------------------------------------------------------


def loadgen(url: str, out: Path, *, models: list[str], requests: int, max_tokens: int, prompt_words: int,
            sampling: str, concurrency: int | None = None, rate: float | None = None, zipf: float = 0.0,
            processes: int = 1, timeout: float = 600.0, times: ProcessTimes | None = None) -> dict:  # fmt: skip
    """One `python -m loadtests.loadgen` run (streaming completions, EOS ignored) -> its report (with `times`, the
    CPU microseconds the engine and the API processes spent per output token, under `cpu_us_per_token`)."""
    before = times.take() if times else None
    command = [sys.executable, "-m", "loadtests.loadgen", "--url", url, "--endpoint", "completions",
               "--model", ",".join(models), "--zipf", str(zipf), "--requests", str(requests),
               "--max-tokens", str(max_tokens), "--prompt-words", str(prompt_words), "--ignore-eos",
               "--sampling", sampling, "--processes", str(processes), "--timeout", str(timeout),
               "--json", str(out), "--no-plot"]  # fmt: skip
    command += ["--concurrency", str(concurrency)] if concurrency else ["--rate", str(rate)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout + 120)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads(out.read_text())
    if times is not None:
        after, tokens = times.take(), max(1, report["tokens"]["output"])
        report["cpu_us_per_token"] = {"engine": 1e6 * (after[0] - before[0]) / tokens,
                                      "api": 1e6 * (after[1] - before[1]) / tokens}  # fmt: skip
    return report


class ProcessTimes:
    """CPU seconds of the server's processes: the engine process (and its adapter readers) and the rest (the API)."""

    def __init__(self, server_pid: int, url: str) -> None:
        import httpx
        import psutil

        self.root = psutil.Process(server_pid)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        pid = next(
            int(float(line.split()[-1])) for line in metrics.splitlines() if line.startswith("loramux_engine_pid")
        )
        self.engine = psutil.Process(pid)

    def take(self) -> tuple[float, float]:
        """(engine, API) CPU seconds so far."""

        def cpu(p) -> float:
            try:
                t = p.cpu_times()
                return t.user + t.system
            except Exception:  # gone meanwhile
                return 0.0

        engine_side = {self.engine.pid, *(c.pid for c in self.engine.children(recursive=True))}
        tree = [self.root, *self.root.children(recursive=True)]
        engine = sum(cpu(p) for p in tree if p.pid in engine_side)
        return engine, sum(cpu(p) for p in tree if p.pid not in engine_side)


def summary(report: dict) -> dict:
    """The figures of a loadgen report that the table shows."""
    lat = report["latency_s"]
    return {
        "tokens_per_s": report["throughput"]["output_tokens_per_s"],
        "requests_completed": report["requests"]["completed"],
        "requests_failed": report["requests"]["failed"] + report["requests"]["dropped"],
        "errors": report.get("errors", {}),
        "output_tokens": report["tokens"]["output"],
        "wall_s": report["wall_s"],
        "ttft_p50_s": lat["ttft"]["p50"], "ttft_p99_s": lat["ttft"]["p99"],
        "tpot_p50_s": lat["tpot"]["p50"], "tpot_p99_s": lat["tpot"]["p99"],
        "sampling": report["config"].get("sampling"),
        "cpu_us_per_token": report.get("cpu_us_per_token"),
    }  # fmt: skip


def engine_steps(url: str) -> dict[str, float]:
    """The engine's step counters as `/metrics` gives them: steps, their seconds and prompt tokens, by kind."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    prefixes = ("loramux_steps_", "loramux_step_seconds_", "loramux_step_prompt_tokens_")
    return {
        name.removeprefix("loramux_"): float(value)
        for name, value in (line.split()[:2] for line in text.splitlines() if line.startswith(prefixes))
    }


def steps_between(before: dict[str, float], after: dict[str, float]) -> dict[str, dict]:
    """The steps a workload ran in the server's engine, by kind (decode, mixed, prefill): how many, their mean
    milliseconds and the prompt tokens they computed."""
    out = {}
    for kind in ("decode", "mixed", "prefill"):
        steps = after.get(f"steps_{kind}", 0.0) - before.get(f"steps_{kind}", 0.0)
        seconds = after.get(f"step_seconds_{kind}", 0.0) - before.get(f"step_seconds_{kind}", 0.0)
        tokens = after.get(f"step_prompt_tokens_{kind}", 0.0) - before.get(f"step_prompt_tokens_{kind}", 0.0)
        out[kind] = {"steps": int(steps), "ms_mean": 1e3 * seconds / steps if steps else None,
                     "prompt_tokens": int(tokens)}  # fmt: skip
    return out


# -- the run -----------------------------------------------------------------------------------------------------


def engine_alone(checkpoint: Path, out: Path, engine_args: list[str], env: dict[str, str]) -> dict:
    """`bench_engine.py --base CKPT ...` in a process of its own -> its figures."""
    command = [sys.executable, str(REPO / "loadtests" / "bench_engine.py"), "--base", str(checkpoint),
               "--json", str(out), *engine_args]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    print(done.stdout[-3000:], flush=True)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench_engine failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def plan(args: argparse.Namespace) -> dict:
    """The sizes of the run."""
    if args.tiny:
        return {"shape": "tiny", "requests": args.requests or 128, "concurrency": args.requests or 128,
                "gen": 64, "prompt_words": 24, "w1_adapters": 4, "w1_rank": 8, "w2_adapters": 0,
                "stream_gen": 64, "sampling": [("default", "default"), ("greedy", "greedy")],
                "server": ["--max-num-seqs", "128", "--max-num-batched-tokens", "2048", "--slots", "8",
                           "--max-lora-rank", "8"],
                "engine": ["--slots", "8", "--max-lora-rank", "8", "--max-num-seqs", "128",
                           "--max-batched-tokens", "2048"]}  # fmt: skip
    return {"shape": args.shape, "requests": args.requests or 256, "concurrency": args.requests or 256,
            "gen": 128, "prompt_words": 96, "w1_adapters": 32, "w1_rank": 16, "w2_adapters": 1000,
            "stream_gen": 512, "sampling": [("mix", "mix"), ("greedy", "greedy")],
            "server": ["--slots", "64", "--max-lora-rank", "64"],
            "engine": ["--slots", "64", "--max-lora-rank", "64"]}  # fmt: skip


def run(args: argparse.Namespace, root: Path, results: dict) -> None:
    p = plan(args)
    shape = SHAPES[p["shape"]]
    device = args.device
    began = time.perf_counter()
    env = {**os.environ, "LORAMUX_HOME": str(root / "home")}
    env.pop("HF_HUB_OFFLINE", None)  # the pushes go to the server started here, and nowhere else
    if device == "cpu":  # a tiny model needs no intra-op threads: the cores go to the API and the client
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    checkpoint = root / "checkpoint"
    if not (checkpoint / "config.json").exists():  # a --workdir keeps it for the next run
        write_checkpoint(checkpoint, shape, args.tokenizer, device)
    results["checkpoint_seconds"] = time.perf_counter() - began
    print(f"checkpoint ready in {results['checkpoint_seconds']:.0f}s", flush=True)
    w1_dirs = [write_adapter(root / "adapters" / f"w1-{i}", shape, p["w1_rank"], list(LINEAR_MODULES), seed=i)
               for i in range(min(4, p["w1_adapters"]))]  # fmt: skip
    w1 = [(w1_dirs[i % len(w1_dirs)], f"bench/w1-{i}") for i in range(p["w1_adapters"])]
    names = [name for _, name in w1]
    n, concurrency = p["requests"], p["concurrency"]
    http: dict = results.setdefault("http", {})
    failures: dict = results.setdefault("failures", {})
    # the engine alone first, then through HTTP (one at a time on the device)
    if "engine" in args.parts:
        parts = "w1" if args.workloads and not any(w.startswith("stream") for w in args.workloads) else "w1,stream"
        engine_args = [*p["engine"], "--only", parts, "--w1-requests", str(n), "--w1-adapters",
                       str(p["w1_adapters"]), "--w1-rank", str(p["w1_rank"]), "--prompt", str(args.engine_prompt),
                       "--gen", str(p["gen"]), "--stream-gen", str(p["stream_gen"]), "--device", device,
                       "--sampling", args.engine_sampling]  # fmt: skip
        results["engine"] = engine_alone(checkpoint, root / "engine.json", engine_args, env)
        save(args, results)
    if "http" in args.parts:
        (root / "home").mkdir(parents=True, exist_ok=True)
        process, url, log, ready_s = start_server(checkpoint, root / "home", p["server"], env)
        results["server"] = {"args": p["server"], "ready_seconds": ready_s}
        print(f"loramux serve ready in {ready_s:.0f}s", flush=True)
        try:
            started = time.perf_counter()
            push_with_cli(w1, url, env)
            results["push_w1_seconds"] = time.perf_counter() - started
            times = ProcessTimes(process.pid, url)
            common = {"max_tokens": p["gen"], "prompt_words": p["prompt_words"], "processes": args.client_processes,
                      "times": times}  # fmt: skip
            # A warm-up: every adapter in a slot, then a whole W1 batch (users' mix, 4 tokens) with the adapters and
            # one without, so that what a fresh server meets once (a kernel variant compiled at its first use, the
            # first allocations) falls on no measured workload, whichever runs first. Those two batches' figures
            # are kept as the fresh server's ("cold"): a user's first requests pay what they paid.
            loadgen(url, root / "warm.json", models=names, requests=len(names), concurrency=len(names),
                    sampling="mix", **{**common, "max_tokens": 4})  # fmt: skip
            cold = results.setdefault("cold", {})
            for label, models in (("w1_adapters", names), ("w1_base", [checkpoint.name])):
                report = loadgen(url, root / f"cold-{label}.json", models=models, requests=n, concurrency=concurrency,
                                 sampling="mix", **{**common, "max_tokens": 4})  # fmt: skip
                cold[label] = summary(report)
            w1_runs = {f"w1_{label}": (names, s) for label, s in p["sampling"]}
            w1_runs |= {f"w1_base_{label}": ([checkpoint.name], s) for label, s in p["sampling"]}
            one = {**common, "max_tokens": p["stream_gen"], "processes": 1}
            # in order of importance: a run left out for time is one of the last
            workloads = [
                *(
                    (key, lambda key=key, m=m, s=s: loadgen(url, root / f"{key}.json", models=m, requests=n,
                                                            concurrency=concurrency, sampling=s, **common))
                    for key, (m, s) in w1_runs.items()
                ),
                *(
                    (f"stream_{label}", lambda label=label: loadgen(url, root / f"stream_{label}.json",
                                                                    models=[names[0]], requests=1, concurrency=1,
                                                                    sampling=label, **one))
                    for label in ("greedy", "default")
                ),
            ]  # fmt: skip
            if p["w2_adapters"]:
                workloads.append(("w2_mix", lambda: w2_run(root, shape, url, p["w2_adapters"], common, results)))
            order = ["w1_mix", "w1_default", "w1_greedy", "w1_base_mix", "w1_base_default", "stream_greedy", "w2_mix"]
            workloads.sort(key=lambda kw: order.index(kw[0]) if kw[0] in order else len(order))
            if args.workloads:
                workloads = [(key, work) for key, work in workloads if key in args.workloads]
            for key, work in workloads:
                if time.perf_counter() - began > args.http_budget:
                    failures[key] = f"left out: the run's {args.http_budget:.0f} s for HTTP were spent"
                    continue
                try:
                    before = engine_steps(url)
                    http[key] = summary(work())
                    http[key]["steps"] = steps_between(before, engine_steps(url))
                    print(f"  {key}: {http[key]['tokens_per_s']:.1f} tokens/s", flush=True)
                    save(args, results)  # what is measured so far survives a run cut short
                except Exception as exc:  # the other workloads still run
                    failures[key] = f"{type(exc).__name__}: {exc}"[:2000]
                    print(f"  {key} failed: {failures[key][:300]}", flush=True)
        finally:
            results["server"]["exit_status"] = stop_server(process)
            results["server"]["log_tail"] = log.read_text(errors="replace")[-3000:]


def w2_adapters(root: Path, shape: dict, count: int, ranks: tuple[int, ...] = (8, 16, 32, 64)) -> list[tuple]:
    """W2's adapters: `count` names `bench/w2-I` of ranks 8 to 64 in turn on q_proj and v_proj, sharing one weights
    file per rank (written under `root/adapters`) -> [(directory, name)] for `push_many`."""
    shared = {r: write_adapter(root / "adapters" / f"w2-r{r}", shape, r, ["q_proj", "v_proj"], seed=100 + r)
              for r in ranks}  # fmt: skip
    return [(shared[ranks[i % len(ranks)]], f"bench/w2-{i}") for i in range(count)]


def w2_run(root: Path, shape: dict, url: str, count: int, common: dict, results: dict) -> dict:
    """W2's adapters (ranks 8 to 64 on q_proj and v_proj, four weights files shared by name) pushed, then 512
    requests over them with Zipf popularity and Poisson arrivals at 100/s."""
    w2 = w2_adapters(root, shape, count)
    started = time.perf_counter()
    push_many(w2, url)
    results["push_w2_seconds"] = time.perf_counter() - started
    print(f"  pushed {count} adapters in {results['push_w2_seconds']:.0f}s", flush=True)
    return loadgen(url, root / "w2.json", models=[name for _, name in w2], requests=512, rate=100.0, zipf=1.0,
                   sampling="mix", **common)  # fmt: skip


def save(args: argparse.Namespace, results: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**results, "ratios": ratios(results, args.tiny)}, indent=2, default=str))


def ratios(results: dict, tiny: bool) -> dict:
    """The figures the issue's targets are stated in."""
    http, engine = results.get("http", {}), results.get("engine", {})
    out: dict = {}

    def rate(source: dict, key: str) -> float | None:
        return source.get(key, {}).get("tokens_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    mix = "default" if tiny else "mix"
    out["w1_http_mix_over_engine_greedy"] = ratio(rate(http, f"w1_{mix}"), rate(engine, "w1_lora_greedy"))
    out["w1_http_greedy_over_engine_greedy"] = ratio(rate(http, "w1_greedy"), rate(engine, "w1_lora_greedy"))
    out["w1_base_http_mix_over_engine"] = ratio(rate(http, f"w1_base_{mix}"), rate(engine, f"w1_base_{mix}"))
    out["w1_base_http_greedy_over_engine"] = ratio(rate(http, "w1_base_greedy"), rate(engine, "w1_base_greedy"))
    out["w1_http_adapters_over_base"] = ratio(rate(http, f"w1_{mix}"), rate(http, f"w1_base_{mix}"))
    out["w2_http_over_w1_http"] = ratio(rate(http, "w2_mix"), rate(http, f"w1_{mix}"))
    out["stream_http_greedy_over_engine"] = ratio(rate(http, "stream_greedy"), rate(engine, "stream_greedy"))
    out["engine_sampling_over_greedy"] = ratio(rate(engine, f"w1_base_{mix}"), rate(engine, "w1_base_greedy"))
    step = engine.get("w1_lora_greedy", {}).get("decode_step_ms_median")
    tpot = http.get(f"w1_{mix}", {}).get("tpot_p50_s")
    out["w1_tpot_p50_over_engine_decode_step"] = ratio(tpot * 1e3 if tpot else None, step)
    return out


def table(results: dict) -> str:
    rows = [("W1, adapters, sampling mix", "http", "w1_mix"), ("W1, adapters, greedy", "http", "w1_greedy"),
            ("W1, no adapters, sampling mix", "http", "w1_base_mix"),
            ("W1, no adapters, greedy", "http", "w1_base_greedy"),
            ("W1, adapters, temperature 1.0", "http", "w1_default"),
            ("W1, no adapters, temperature 1.0", "http", "w1_base_default"),
            ("W2, 1,000 adapters, mix", "http", "w2_mix"), ("one stream, temperature 1.0", "http", "stream_default"),
            ("one stream, greedy", "http", "stream_greedy"),
            ("engine alone: W1 adapters, greedy", "engine", "w1_lora_greedy"),
            ("engine alone: W1 adapters, mix", "engine", "w1_lora_mix"),
            ("engine alone: W1 no adapters, greedy", "engine", "w1_base_greedy"),
            ("engine alone: W1 no adapters, mix", "engine", "w1_base_mix"),
            ("engine alone: W1 no adapters, temperature 1.0", "engine", "w1_base_default"),
            ("engine alone: W1 adapters, temperature 1.0", "engine", "w1_lora_default"),
            ("engine alone: one stream, greedy", "engine", "stream_greedy"),
            ("fresh server: W1 adapters, mix, 4 tokens", "cold", "w1_adapters"),
            ("fresh server: W1 no adapters, mix, 4 tokens", "cold", "w1_base")]  # fmt: skip
    lines = [f"{'workload':48} {'tokens/s':>10} {'TPOT p50':>9} {'TTFT p50':>9} {'CPU us/token engine, API':>25}",
             "-" * 106]  # fmt: skip
    for label, source, key in rows:
        fig = results.get(source, {}).get(key)
        if not fig:
            continue
        tpot = fig.get("tpot_p50_s")
        ttft = fig.get("ttft_p50_s")
        tpot_text = f"{1e3 * tpot:7.1f}ms" if tpot else f"{'':9}"
        ttft_text = f"{ttft:8.2f}s" if ttft is not None else ""
        failed = f"  ({fig['requests_failed']} failed)" if fig.get("requests_failed") else ""
        cpu = fig.get("cpu_us_per_token")
        cpu_text = f"{cpu['engine']:13.0f}, {cpu['api']:5.0f}" if cpu else ""
        lines.append(f"{label:48} {fig['tokens_per_s']:10.1f} {tpot_text} {ttft_text:>9} {cpu_text}{failed}")
    for key, value in results.get("ratios", {}).items():
        if value is not None:
            lines.append(f"{key:48} {value:10.3f}")
    return "\n".join(lines)


def default_tokenizer_dir() -> Path:
    from loramux.server.models.checkpoint import default_base_dir

    return default_base_dir()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=help_text(__doc__))
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (the host's work is what is measured)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="the checkpoint's shape")
    p.add_argument("--tokenizer", type=Path, help="a directory with tokenizer.json (default: the default model's)")
    p.add_argument("--requests", type=int, help="W1's requests, all in flight (default 256; --tiny 128)")
    p.add_argument("--engine-prompt", type=int, default=100, help="the engine alone's prompt tokens (about W1's)")
    p.add_argument("--client-processes", type=int, default=None, help="load generator processes (default: by CPUs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one; cpu with --tiny)")
    p.add_argument("--workdir", type=Path, help="keep the checkpoint, logs and reports here (default: a temp dir)")
    p.add_argument("--only", default="http,engine", help="http (through loramux serve), engine (alone), or both")
    p.add_argument("--workloads", help="only these HTTP workloads, e.g. w1_mix,w1_greedy,w2_mix (default: all)")
    p.add_argument("--engine-sampling", help="the engine alone's W1 sampling kinds (default: greedy and the mix)")
    p.add_argument(
        "--http-budget", type=float, default=math.inf, help="seconds after which HTTP workloads not begun are left out"
    )
    p.add_argument("--json", type=Path, help="default: a new dated file under loadtests/results/ (none with --tiny)")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.shape = "tiny"
    args.parts = {x for x in args.only.split(",") if x}
    args.workloads = {x for x in (args.workloads or "").split(",") if x}
    args.engine_sampling = args.engine_sampling or ("greedy,default" if args.tiny else "greedy,mix")
    if args.parts - {"http", "engine"}:
        p.error("--only: http, engine or both")
    if args.client_processes is None:
        args.client_processes = 1 if args.tiny else max(1, min(8, (os.cpu_count() or 2) // 4))
    if args.tokenizer is None:
        args.tokenizer = default_tokenizer_dir()
    if args.json is None and not args.tiny:
        args.json = dated_json_path("serve")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    results = run_header("loadtests/bench_serve.py", argv, args.device, args.shape)
    try:
        with workdir(args.workdir, "loramux-bench-serve-") as root:
            run(args, root, results)
    finally:  # what was measured is kept even when a later part failed
        results["ratios"] = ratios(results, args.tiny)
        print(table(results))
        save(args, results)
        if args.json:
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
