"""The engine benchmark's tiny variant runs end to end on the CPU, so that CI guards the script."""

from __future__ import annotations

import json
import re
from pathlib import Path

from loadtests.bench_engine import main, parse_args
from loadtests.record import RESULTS


def test_tiny_benchmark_runs_every_part_and_writes_its_figures(tmp_path: Path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["--tiny", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in ("w1_lora_greedy", "w1_base_greedy", "peft_mixed", "hf_base", "stream_greedy", "w2"):
        assert results[key]["tokens_per_s"] > 0, key
    assert results["w1_lora_greedy"]["generated_tokens"] == 8 * 4  # every request generated exactly --gen tokens
    assert results["stream_greedy"]["generated_tokens"] == 8
    assert results["w2"]["requests"] == 12 and results["w2"]["ttft_p99_s"] >= results["w2"]["ttft_p50_s"] > 0
    assert results["load"]["cpu_to_slot_ms"] > 0 and results["load"]["disk_to_slot_ms"] > 0
    for label in ("adapters", "base"):  # each mixed step took its 1 to 6 new prompts of 8 tokens whole
        mixed = results["mixed"][label]
        assert list(mixed["mixed_ms_median"]) == ["8", "16", "32", "48"] and mixed["decode_ms_median"] > 0, label
    assert "loramux W1, 32 adapters, greedy" in capsys.readouterr().out


def test_repeated_runs_report_the_median_run_and_keep_every_run(tmp_path: Path, capsys):
    out = tmp_path / "tiny.json"
    argv = ["--tiny", "--device", "cpu", "--only", "w1,w2", "--repeats", "2", "--sampling", "greedy,mix"]
    assert main([*argv, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in ("w1_lora_greedy", "w1_base_greedy", "w1_lora_mix", "w1_base_mix", "w2"):
        rates = [r["tokens_per_s"] for r in results[key]["runs"]]
        assert len(rates) == 2 and results[key]["tokens_per_s"] == min(rates), key  # of two, the lower middle
    assert results["w1_lora_mix"]["generated_tokens"] == 8 * 4
    w2 = results["w2"]
    assert w2["steps"] == sum(k["steps"] for k in w2["steps_by_kind"].values()) > 0
    assert "w2, each run" in capsys.readouterr().out


def test_a_run_writes_a_new_dated_json_under_loadtests_results_unless_told_otherwise(tmp_path):
    path = parse_args([]).json
    assert path.parent == RESULTS and re.fullmatch(r"\d{4}-\d\d-\d\d-engine-\w+(-dirty)?(-\d+)?\.json", path.name)
    assert not path.exists()  # named, not yet written
    assert parse_args(["--json", str(tmp_path / "x.json")]).json == tmp_path / "x.json"
    assert parse_args(["--tiny"]).json is None  # a smoke test keeps no record
