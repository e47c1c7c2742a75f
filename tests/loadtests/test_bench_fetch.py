"""The fetch contention benchmark's tiny variant runs on the CPU, so that CI guards the script."""

from __future__ import annotations

from loadtests.bench_fetch import main


def test_tiny_fetch_benchmark_times_each_mode(tmp_path, capsys):
    assert main(["--tiny", "--threads", "1", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["idle", "load_file", "load_lora", "arena"]  # pin_new: GPU only
    assert all("reads/s" in line for line in lines[1:])
