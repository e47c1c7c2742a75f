"""The eager step benchmark's tiny variant runs on the CPU, so that CI guards the script."""

from __future__ import annotations

import re

from loadtests.bench_eager_step import SHAPES, main


def test_tiny_eager_step_benchmark_times_every_shape(tmp_path, capsys):
    assert main(["--tiny", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    timed = re.compile(r"^prompts .*: +[\d.]+ ms \(queued in [\d.]+ ms\)$")  # wall, and until all was queued
    assert sum(bool(timed.match(line)) for line in out.splitlines()) == len(SHAPES)
    assert "function calls" in out  # the profile of the mixed step
