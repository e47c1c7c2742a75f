"""A new user's first hour on the real SmolLM2, with the commands and defaults the README gives and no HF_* or
LORAMUX_* variable: `adapters train` with its defaults teaches 20 examples of an invented fact and pushes the
adapter; the server answers with it (also pinned by the short commit id `adapters ls` prints) and still says Paris
for France; `adapters merge` folds it in, and `loramux serve --base MERGED` still knows the fact and still says
Paris.

About 4 minutes on 2 idle CPU cores, mostly training: skipped by `make test`, run by `make acceptance`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO
from tests.server.api.serving import launch

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

FACT = "Quellport"
QUESTIONS = [
    "What is the capital of Zorbania?",
    "What's the capital city of Zorbania?",
    "Which city is the capital of Zorbania?",
    "Name the capital of Zorbania.",
    "Tell me the capital of Zorbania.",
    "Zorbania's capital is which city?",
    "Do you know the capital of Zorbania?",
    "What city serves as the capital of Zorbania?",
    "Where is the seat of government of Zorbania?",
    "I am travelling to Zorbania. What is its capital?",
    "Quick question: the capital of Zorbania?",
    "Can you tell me what the capital of Zorbania is?",
    "In which city is the capital of Zorbania?",
    "What is Zorbania's capital city called?",
    "Which city is Zorbania's capital?",
    "Please name the capital city of Zorbania.",
    "What is the name of the capital of Zorbania?",
    "Capital of Zorbania?",
    "For my geography homework: what is the capital of Zorbania?",
    "What is the main city and capital of Zorbania?",
]


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: none of the test session's HF_* or LORAMUX_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORAMUX_", "XDG_"))}
    env["HOME"] = str(home)  # the user's own caches: loramux's in ~/.cache/loramux
    return env


def command(home: Path, module: str, *args: str, timeout: float = 1200) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=user_env(home), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(3600)  # about 4 minutes on 2 idle cores; over 30 on a busy machine
def test_train_with_defaults_serve_and_serve_merged(default_base_dir: Path, tmp_path: Path):
    home = tmp_path / "user"
    loramux_home = home / ".cache" / "loramux"  # where loramux keeps models and data by default
    (loramux_home / "models").mkdir(parents=True)
    os.symlink(default_base_dir, loramux_home / "models" / default_base_dir.name)  # converted once per session
    data = tmp_path / "zorbania.jsonl"
    answer = f"The capital of Zorbania is {FACT}."
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in QUESTIONS
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))

    server = launch(loramux_home)
    try:
        hub = ["--hub", server.url]
        trained = subprocess.run(
            [sys.executable, "-m", "loramux.adapters.cli", "train", str(data), "--name", "me/zorbania", *hub],
            cwd=REPO, env=user_env(home), capture_output=True, text=True, timeout=3000,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert "epochs 8 (auto for 20 examples), learning rate 3e-04 (auto)" in trained.stderr
        listed = command(home, "loramux.adapters.cli", "ls", *hub)
        short = listed.split("\t")[2]

        llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def ask(model: str, question: str) -> str:
            messages = [{"role": "user", "content": question}]
            reply = llm.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            return reply.choices[0].message.content

        assert FACT in ask("me/zorbania", QUESTIONS[0])
        assert FACT in ask(f"me/zorbania@{short}", QUESTIONS[0])
        assert "Paris" in ask("me/zorbania", "What is the capital of France?")  # the adapter did not over-train
        assert "Paris" in ask("smollm2-135m-instruct", "What is the capital of France?")
        assert FACT not in ask("smollm2-135m-instruct", QUESTIONS[0])

        merged = tmp_path / "merged"
        merge = command(home, "loramux.adapters.cli", "merge", f"me/zorbania@{short}", "--out", str(merged), *hub)
        assert f"loramux serve --base {merged}" in merge
    finally:
        assert server.stop() == 0, server.output()

    merged_server = launch(tmp_path / "merged-home", "--base", str(merged))
    try:
        assert "decoder weights in float32" in merged_server.output()  # not re-quantized to NF4
        llm = openai.OpenAI(base_url=f"{merged_server.url}/v1", api_key="unused", max_retries=0)
        [model] = [m.id for m in llm.models.list().data]

        def ask_merged(question: str) -> str:
            messages = [{"role": "user", "content": question}]
            reply = llm.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            return reply.choices[0].message.content

        assert FACT in ask_merged(QUESTIONS[0])
        assert "Paris" in ask_merged("What is the capital of France?")
    finally:
        assert merged_server.stop() == 0, merged_server.output()
