"""The `loramux` command as a user runs it: one line on error, a non-zero exit."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_answer(tiny_checkpoint):
    from loramux.server.models.loader import load_base

    path = tiny_checkpoint()
    result = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    base = load_base(str(path), device="cpu")
    ids = base.chat_prompt_ids([{"role": "user", "content": "hello"}])
    expected = base.tokenizer.decode(
        base.model.generate_greedy(ids, 8, base.stop_token_ids()), skip_special_tokens=True
    )
    assert result.stdout == expected + "\n"


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
