"""The step host-time benchmark runs on the CPU in seconds, so that CI guards the script."""

from __future__ import annotations

import json

import pytest

from loadtests.bench_step_host import main


@pytest.mark.parametrize("adapters", [0, 2])
def test_step_host_benchmark_times_decode_steps_of_every_request(capsys, tmp_path, adapters):
    out_json = tmp_path / "step-host.json"
    argv = ["--requests", "8", "--steps", "3", "--vocab", "64", "--adapters", str(adapters), "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"8 requests, {adapters} adapters: ") and "ms of host time per decode step" in out
    assert "function calls" in out  # the profile
    figures = json.loads(out_json.read_text())
    assert figures["adapters"] == adapters and figures["ms_per_step_median"] > 0 and len(figures["repetitions_ms"]) == 4
