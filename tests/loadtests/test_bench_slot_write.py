"""The slot-write benchmark runs on the CPU, so that CI guards the script."""

from __future__ import annotations

import re

from loadtests.bench_slot_write import main


def test_slot_write_benchmark_times_a_write_with_either_b_layout_and_with_new_writers(tmp_path, capsys):
    runs = (([], "rank-major B, "), (["--row-major"], "row-major B, "), (["--fresh"], "rank-major B, fresh, "))
    for extra, shown in runs:
        assert main(["--slots", "4", "--layers", "2", "--rounds", "1", "--root", str(tmp_path), *extra]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"^slot write: [\d.]+ ms a write \(4 slots, 2 layers, {shown}cpu\)$", out, re.M)
        assert "function calls" in out  # the profile of one round
