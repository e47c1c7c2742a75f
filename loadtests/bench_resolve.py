"""First use of an adapter from the local registry: how long `RegistrySource.resolve` takes to check its blobs and
lay them out for the engine, in a process that has verified none of them yet (as the engine's, at a new server's
first request for each adapter).

    python loadtests/bench_resolve.py [--adapters 10] [--rank 32] [--rounds 3]

W2-sized adapters by default: the Llama-3-8B shape, rank 32 on q_proj and v_proj (26 MiB). Prints the median over
every first resolve of every round (each round a fresh view of the registry and an empty cache); `--json` keeps it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from loadtests.bench_serve import write_adapter
from loadtests.record import commit, help_text, workdir
from loadtests.shapes import LLAMA3_8B
from loramux.core.adapter_source import AdapterRef
from loramux.registry.registry import AddFile, Caller, Registry
from loramux.registry.source import RegistrySource

LOCAL = Caller(local=True)


def push(registry: Registry, name: str, directory: Path) -> None:
    operations = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        with open(path, "rb") as f:
            sha, size = registry.store_blob(f)
        operations.append(AddFile(path.name, sha, size))
    registry.create_repo(name, LOCAL, private=True)
    registry.commit(name, LOCAL, operations, "bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=help_text(__doc__))
    p.add_argument("--adapters", type=int, default=10)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    with workdir(None, "loramux-bench-resolve-") as root:
        registry = Registry.open(root / "data")
        for i in range(args.adapters):
            push(registry, f"bench/a{i}", write_adapter(root / f"a{i}", LLAMA3_8B, args.rank, ["q_proj", "v_proj"], i))
        size = sum(f.stat().st_size for f in (root / "a0").iterdir())
        seconds = []
        for round_ in range(args.rounds):
            source = RegistrySource(Registry.open(root / "data"), root / f"cache-{round_}")  # nothing verified yet
            for i in range(args.adapters):
                started = time.perf_counter()
                source.resolve(AdapterRef.parse(f"bench/a{i}"), None)
                seconds.append(time.perf_counter() - started)
    median_ms = statistics.median(seconds) * 1000
    print(f"adapter of {size / 2**20:.1f} MiB: first resolve {median_ms:.1f} ms (median of {len(seconds)})")
    if args.json:
        figures = {"adapter_bytes": size, "first_resolve_ms_median": median_ms, "resolves": len(seconds)}
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "commit": commit(), **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
