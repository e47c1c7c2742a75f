"""The training benchmark's flow on the tiny shape (CPU, fp32): it writes a loadable checkpoint, runs loramux's trainer
and the plain transformers + PEFT + bitsandbytes loop on the same data, and reports comparable figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loadtests.bench_train import BASELINE, TINY, main, write_checkpoint

SEQ_LEN, WARMUP, STEPS = 96, 1, 2


def test_tiny_run_trains_both_implementations_on_the_same_tokens(tmp_path: Path, capsys):
    report_path = tmp_path / "train.json"
    argv = ["--tiny", "--seq-len", str(SEQ_LEN), "--warmup", str(WARMUP), "--steps", str(STEPS)]
    assert main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    assert report["meta"]["seq_len"] == SEQ_LEN and report["meta"]["lora"]["r"] == 16
    assert set(report["phases_s"]) == {"checkpoint", "loramux", BASELINE}
    results = {r["impl"]: r for r in report["results"]}
    assert set(results) == {"loramux", BASELINE}
    for r in results.values():
        # Every row is cut to exactly --seq-len tokens, one row a step: the count comes from the runs themselves.
        assert (r["measured_steps"], r["tokens"]) == (STEPS, STEPS * SEQ_LEN)
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0 and r["load_s"] > 0
        assert len(r["losses"]) == WARMUP + STEPS and all(math.isfinite(x) for x in r["losses"])
        assert r["losses"][-1] < r["losses"][0]  # the LoRA learns the repeated conversation
        assert r["peak_train_gib"] is None  # no GPU memory on the CPU
    ours, theirs = results["loramux"]["losses"], results[BASELINE]["losses"]
    # Same base, same tokens, same learned labels, and LoRA's B starts at zero: step 1 is the base's loss in both.
    assert ours[0] == pytest.approx(theirs[0], rel=1e-4)
    assert ours == pytest.approx(theirs, rel=1e-2)

    out = capsys.readouterr().out
    table = out[out.index("implementation") :].splitlines()
    assert table[1].split()[0] == "loramux" and table[2].split()[0] == BASELINE
    assert "loramux / baseline: tokens/s x" in out
    assert "[checkpoint]" in out and f"[{BASELINE}]" in out  # each phase's time


def test_the_checkpoint_has_every_tensor_transformers_expects_and_is_reused(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    directory = write_checkpoint(tmp_path / "tiny", TINY, torch.float32, torch.device("cpu"))
    model, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_key_value_heads == TINY["num_key_value_heads"]
    shard = directory / "model-00002-of-00004.safetensors"  # decoder layer 0
    written = shard.stat().st_mtime_ns
    assert write_checkpoint(tmp_path / "tiny", TINY, torch.float32, torch.device("cpu")) == directory
    assert shard.stat().st_mtime_ns == written

    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="is no checkpoint of this shape"):
        write_checkpoint(tmp_path / "other", TINY, torch.float32, torch.device("cpu"))
    assert list((tmp_path / "other").iterdir()) == []  # left alone


def test_bad_arguments_get_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--tiny", "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tiny", "--seq-len", "8"])
    assert "--seq-len must be from 32 to 8192" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tiny", "--json", "/no/such/dir/train.json"])
    assert "--json: directory /no/such/dir does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([]) == 1
        assert "the full-size run needs a CUDA device" in capsys.readouterr().err
