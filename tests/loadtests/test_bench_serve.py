"""The end-to-end benchmark's tiny variant runs whole on the CPU, so that CI guards it: a checkpoint with the real
tokenizer, `loramux serve` as a process, adapters pushed with `adapters push`, the load generator over HTTP, the
engine alone on the same checkpoint, one JSON with every figure and ratio, and the server engine's steps by kind per
workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.bench_serve import main

pytestmark = pytest.mark.slow  # converts the default model once for its tokenizer


def test_tiny_end_to_end_benchmark_measures_every_workload(tmp_path: Path, capsys, default_base_dir):
    out = tmp_path / "serve.json"
    assert main(["--tiny", "--requests", "8", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in ("w1_default", "w1_greedy", "w1_base_default", "w1_base_greedy", "stream_default", "stream_greedy"):
        figure = results["http"][key]
        assert figure["tokens_per_s"] > 0 and figure["requests_failed"] == 0, key
        assert figure["output_tokens"] == (64 if key.startswith("stream") else 8 * 64), key  # EOS ignored: all of them
        steps = figure["steps"]  # the server engine's steps while the workload ran
        assert steps["decode"]["steps"] >= 63 and steps["decode"]["prompt_tokens"] == 0, key
        prompt = sum(steps[kind]["prompt_tokens"] for kind in ("mixed", "prefill"))
        assert prompt > 0 and steps["prefill"]["steps"] >= 1, key
    for key in ("w1_adapters", "w1_base"):  # the fresh server's first full batches, kept apart
        figure = results["cold"][key]
        assert figure["requests_completed"] == 8 and figure["output_tokens"] == 8 * 4, key
    for key in ("w1_lora_greedy", "w1_base_greedy", "w1_base_default", "stream_greedy"):
        assert results["engine"][key]["tokens_per_s"] > 0, key
    ratios = results["ratios"]
    assert ratios["w1_base_http_greedy_over_engine"] > 0 and ratios["engine_sampling_over_greedy"] > 0
    assert results["server"]["exit_status"] == 0  # SIGTERM: a clean stop
    printed = capsys.readouterr().out
    assert "W1, no adapters, greedy" in printed and "fresh server: W1 no adapters" in printed
