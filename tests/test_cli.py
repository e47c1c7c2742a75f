"""The `loramux` command as a user runs it: one line on error, a non-zero exit."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_answer(tiny_checkpoint):
    """The CLI's answer is transformers' greedy continuation on the same dequantized NF4 weights."""
    import torch
    import transformers

    from loramux.server.layers.nf4_linear import NF4Linear
    from loramux.server.models.loader import load_base

    path = tiny_checkpoint()
    result = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr

    base = load_base(str(path), device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for name, module in base.model.named_modules():
        if isinstance(module, NF4Linear):
            ref.get_submodule(name).weight.data.copy_(module.dequantize())
    ids = base.chat_prompt_ids([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=list(base.stop_token_ids())
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in base.stop_token_ids()]
    assert result.stdout == base.tokenizer.decode(new, skip_special_tokens=True) + "\n"


def test_generate_keeps_a_merged_checkpoint_unquantized(tiny_checkpoint):
    """A checkpoint `adapters merge` wrote answers as transformers does with its own weights, not re-quantized."""
    import json

    import torch
    import transformers

    from loramux.server.models.checkpoint import MERGE_MARKER
    from loramux.server.models.loader import load_base

    path = tiny_checkpoint()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, MERGE_MARKER: {"base": "tiny", "adapters": []}}))
    result = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr

    base = load_base(str(path), device="cpu", quantize="none")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = base.chat_prompt_ids([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=list(base.stop_token_ids())
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in base.stop_token_ids()]
    assert result.stdout == base.tokenizer.decode(new, skip_special_tokens=True) + "\n"
    nf4 = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--quantize", "nf4")
    assert nf4.returncode == 0 and nf4.stdout != result.stdout  # NF4 rounding changes the tiny model's answer


def test_missing_base_fails_with_one_line(tmp_path):
    result = run_cli("generate", "hello", "--base", str(tmp_path / "missing"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("loramux generate: error: base model")


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout


def test_serve_refuses_a_negative_number_of_adapter_readers(tmp_path):
    result = run_cli("serve", "--adapter-readers", "-1", "--data-dir", str(tmp_path / "data"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--adapter-readers must not be negative, got -1" in lines[0]
