"""The slot-write benchmark runs on the CPU, so that CI guards the script."""

from __future__ import annotations

import re

from loadtests.bench_slot_write import main


def test_slot_write_benchmark_times_a_write_with_either_b_layout(tmp_path, capsys):
    for layout in ([], ["--row-major"]):
        assert main(["--slots", "4", "--layers", "2", "--rounds", "1", "--root", str(tmp_path), *layout]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^write_slot: [\d.]+ ms a write \(4 slots, 2 layers, (row|rank)-major B, cpu\)$", out, re.M)
        assert "function calls" in out  # the profile of one round
