"""The step host-time benchmark runs on the CPU in seconds, so that CI guards the script."""

from __future__ import annotations

from loadtests.bench_step_host import main


def test_step_host_benchmark_times_decode_steps_of_every_request(capsys):
    assert main(["--requests", "8", "--steps", "3", "--vocab", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 requests: ") and "ms of host time per decode step" in out
    assert "function calls" in out  # the profile
