"""The sampler benchmark runs on the CPU in seconds, so that CI guards the script."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.bench_sampler import main


def test_sampler_benchmark_times_every_mix_and_writes_its_figures(tmp_path: Path, capsys):
    out = tmp_path / "sampler.json"
    args = ["--batches", "1,4", "--vocabs", "512", "--calls", "2", "--device", "cpu", "--threads", "1"]
    assert main([*args, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    mixes = ("greedy", "t1", "top_p", "mix")
    assert {(r["batch"], r["mix"]) for r in results} == {(b, m) for b in (1, 4) for m in mixes}
    assert all(r["median_ms"] > 0 and len(r["ms"]) == 2 and r["behind_forward_ms"] == [] for r in results)
    assert "vocab 512 (block 16): median ms per call" in capsys.readouterr().out
