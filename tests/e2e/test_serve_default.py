"""End to end: `loramux serve` with no model argument serves the real default SmolLM2 (already converted in the
session's loramux home), and a new user talks to it with the `openai` client and with plain HTTP, as the README
shows."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.api.serving import launch

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_base_dir: Path, tmp_path_factory):
    # A fresh home whose models folder links the converted default model, so nothing is converted again.
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    os.symlink(default_base_dir, home / "models" / default_base_dir.name)
    server = launch(home)
    yield server
    assert server.stop() == 0, server.output()


def test_the_default_model_answers_with_openai_and_curl_alike(server):
    llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in llm.models.list().data] == ["smollm2-135m-instruct"]

    answer = llm.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")

    streamed = llm.chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content

    # What `curl` sends: no key, no client library.
    plain = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 24, "temperature": 0},
        timeout=120,
    )
    assert (
        plain.status_code == 200
        and plain.json()["choices"][0]["message"]["content"] == answer.choices[0].message.content
    )
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready", "model": "smollm2-135m-instruct"}


def test_the_readmes_first_request_answers_paris_at_the_default_settings(server):
    """No temperature, no max_tokens, as the README asks: the default model's own sampling settings (its model card's
    temperature 0.2 and top_p 0.9) and the default cap give a short right answer. The seed only makes the draw
    repeatable; the distribution is the one a request without it samples from."""
    llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    answer = llm.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, seed=0)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens < 100
