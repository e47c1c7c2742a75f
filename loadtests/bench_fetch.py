"""How much adapter reads on background threads slow the step loop's kernel launches, and how fast they read.

The main thread times a loop of small kernel launches (`x.add_(1)` on a 4,096-element tensor, then a synchronise:
the shape of an eager step's host work) while threads read adapters of the Llama-3-8B shape (ranks 8-64 on q_proj
and v_proj, as in W2) in a loop, one way of reading per mode:

- `load_file`: safetensors' `load_file` alone;
- `load_lora`: `load_lora` into a new pageable buffer per adapter (fp32);
- `arena`: what the engine's fetch does: `load_lora` in bf16 into a region of a host arena (page-locked on a GPU,
  where B stays as the file holds it; turned rank-major on the CPU);
- `pin_new`: page-locking a new 54 MB buffer per "read", nothing else (GPU only).

    python loadtests/bench_fetch.py [--modes load_file,load_lora,arena,pin_new] [--threads 2] [--cpu-threads N]
        [--tiny]

The reader threads' torch calls use one CPU thread each on a GPU host, as the engine's fetch threads do there
(`--cpu-threads 0`: torch's default, every core).

Prints, per mode, the loop's median and slowest of 25 runs and the adapters read per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_engine import TINY, write_adapter
from loadtests.record import help_text
from loadtests.shapes import LLAMA3_8B
from loramux.core.model_config import ModelConfig
from loramux.server.engine.adapter_cache import FETCH_CPU_THREADS_ON_GPU
from loramux.server.engine.host_arena import HostArena
from loramux.server.models.lora_weights import load_lora

MODES = ("load_file", "load_lora", "arena", "pin_new")
RANKS = (8, 16, 32, 64)


def write_adapters(root: Path, config: ModelConfig) -> list[Path]:
    paths = []
    for rank in RANKS:
        path = write_adapter(root / f"r{rank}", rank, ["q_proj", "v_proj"], config, seed=rank)
        config_json = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        (path / "adapter_config.json").write_text(json.dumps(config_json))
        paths.append(path)
    return paths


class Reader:
    """One way of reading adapters, called from several threads."""

    def __init__(self, mode: str, paths: list[Path], config: ModelConfig, pin: bool, arena_bytes: int) -> None:
        self.mode, self.paths, self.config = mode, paths, config
        self.arena = HostArena(arena_bytes, pin_memory=pin) if mode == "arena" else None
        self.pin = pin
        self.regions: list[int] = []  # arena: the offsets handed out
        self.kept: list[torch.Tensor] = []  # pin_new: buffers stay locked, as a cache filling up would keep them
        self.lock = threading.Lock()

    def read(self, i: int) -> None:
        path = self.paths[i % len(self.paths)]
        if self.mode == "load_file":
            load_file(str(path / "adapter_model.safetensors"))
        elif self.mode == "load_lora":
            load_lora(path, self.config)
        elif self.mode == "arena":
            load_lora(path, self.config, torch.bfloat16, self._allocate, b_rank_major=not self.pin)  # as the engine
        else:
            buffer = torch.empty(27_000_000, dtype=torch.bfloat16, pin_memory=self.pin)
            with self.lock:
                if len(self.kept) < 120:
                    self.kept.append(buffer)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        assert self.arena is not None
        with self.lock:
            found = self.arena.allocate(nbytes)
            if found is None:  # full: start over, as a cache evicting everything would
                while self.regions:
                    self.arena.free(self.regions.pop())
                found = self.arena.allocate(nbytes)
            assert found is not None
            self.regions.append(found[0])
        return found[1]


def launch_loop(x: torch.Tensor, launches: int = 1500) -> float:
    started = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(x: torch.Tensor, runs: int = 25) -> tuple[float, float]:
    times = [launch_loop(x) for _ in range(runs)]
    return statistics.median(times), max(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_text(__doc__))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--threads", type=int, default=2, help="reader threads")
    parser.add_argument("--root", type=Path, default=Path("/tmp/loramux-bench-fetch"), help="where adapters go")
    parser.add_argument("--tiny", action="store_true", help="tiny adapters and a short run (smoke test)")
    parser.add_argument(
        "--cpu-threads", type=int, default=None, help="CPU threads of each reader's torch calls (0: all; default: as "
        "the engine's fetch threads, 1 on a GPU host, all on a CPU one)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {','.join(MODES)}")
    cuda = torch.cuda.is_available()
    all_cores = torch.get_num_threads()
    cpu_threads = args.cpu_threads if args.cpu_threads is not None else (FETCH_CPU_THREADS_ON_GPU if cuda else 0)
    config = ModelConfig(**(TINY if args.tiny else LLAMA3_8B))
    paths = write_adapters(args.root, config)
    x = torch.zeros(4096, device="cuda" if cuda else "cpu")
    launch_loop(x)
    median, slowest = measure(x)
    print(f"{'idle':10} loop median {1e3 * median:8.2f} ms  max {1e3 * slowest:8.2f} ms", flush=True)
    for mode in modes:
        if mode == "pin_new" and not cuda:
            continue
        reader = Reader(mode, paths, config, pin=cuda, arena_bytes=(64 << 20) if args.tiny else (4 << 30))
        stop = threading.Event()
        count = [0]

        def work(i: int, reader: Reader = reader, stop: threading.Event = stop, count: list[int] = count) -> None:
            torch.set_num_threads(cpu_threads or all_cores)  # this thread's own count (and the default of later ones)
            while not stop.is_set():
                reader.read(i)
                count[0] += 1
                i += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        count[0], began = 0, time.perf_counter()
        median, slowest = measure(x, runs=5 if args.tiny else 25)
        rate = count[0] / (time.perf_counter() - began)
        stop.set()
        for thread in threads:
            thread.join()
        print(f"{mode:10} loop median {1e3 * median:8.2f} ms  max {1e3 * slowest:8.2f} ms  {rate:6.0f} reads/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
