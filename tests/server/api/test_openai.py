"""The OpenAI routes' sampling parameters through the real `loramux serve` on a tiny random base: penalties,
logit_bias, vLLM's extensions, logprobs in OpenAI's shapes (parsed by the `openai` client, streaming and not), the
base's generation_config.json defaults and the default max_tokens; bad values get OpenAI-shaped 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from loadtests.tiny_model import make_tiny_checkpoint
from tests.server.api.serving import launch

HELLO = [{"role": "user", "content": "Hello there"}]
EOS = 258  # the tiny tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    base = make_tiny_checkpoint(root / "tiny", max_position_embeddings=512)
    # The base's own defaults: greedy, at most 5 new tokens (below --default-max-tokens 7).
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 5}))
    server = launch(root / "home", "--base", str(base), "--data-dir", str(root / "data"), "--default-max-tokens", "7")
    server.tokenizer = AutoTokenizer.from_pretrained(str(base))
    yield server
    assert server.stop() == 0, server.output()


def llm(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_a_request_without_settings_takes_the_bases_defaults(server):
    chat = llm(server).chat.completions
    plain = chat.create(model="tiny", messages=HELLO, extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 5  # the base's max_new_tokens, below the server's cap of 7
    greedy = chat.create(model="tiny", messages=HELLO, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content == greedy.choices[0].message.content  # the base's temperature 0
    text = llm(server).completions.create(model="tiny", prompt="Once", extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 16  # completions keep OpenAI's default of 16


def test_logit_bias_penalties_and_vllms_extensions_are_applied(server):
    forced = ord("q") - ord("!")  # the byte "q" in the tiny byte-level vocabulary
    assert server.tokenizer.decode([forced]) == "q"
    answer = llm(server).chat.completions.create(
        model="tiny", messages=HELLO, temperature=1.0, max_tokens=6, logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True, "top_k": 20, "min_p": 0.01, "repetition_penalty": 1.3},
    )  # fmt: skip
    assert answer.choices[0].message.content == "q" * 6
    # Frequency and presence penalties push greedy decoding away from the tokens it already produced.
    settings = {
        "model": "tiny",
        "messages": HELLO,
        "temperature": 0,
        "max_tokens": 12,
        "extra_body": {"ignore_eos": True},
    }
    free = llm(server).chat.completions.create(**settings).choices[0].message.content
    penalised = llm(server).chat.completions.create(**settings, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != free
    assert len(set(penalised.choices[0].message.content)) > len(set(free))  # more distinct tokens


def test_a_token_forced_to_end_the_answer_shows_no_logprob(server):
    answer = llm(server).chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, logit_bias={str(EOS): 100}, logprobs=True
    )
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content == ""
    assert answer.usage.completion_tokens == 1 and answer.choices[0].logprobs.content == []


def test_chat_logprobs_in_openais_shape_streaming_or_not(server):
    settings = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 6, "logprobs": True}
    answer = llm(server).chat.completions.create(**settings, top_logprobs=3, extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    # The tokens' bytes put together are the answer.
    assert (
        b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace") == answer.choices[0].message.content
    )

    chunks = list(
        llm(server).chat.completions.create(**settings, top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    )
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]

    only_chosen = llm(server).chat.completions.create(**settings, extra_body={"ignore_eos": True})
    assert [e.top_logprobs for e in only_chosen.choices[0].logprobs.content] == [[]] * 6  # top_logprobs: 0
    assert llm(server).chat.completions.create(**{**settings, "logprobs": False}).choices[0].logprobs is None


def test_completion_logprobs_in_openais_shape_streaming_or_not(server):
    settings = {"model": "tiny", "prompt": "Once upon", "temperature": 0.8, "seed": 3, "max_tokens": 6}
    answer = llm(server).completions.create(**settings, logprobs=2, extra_body={"ignore_eos": True})
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(logprob)  # the top 2, and the chosen token
    chunks = list(llm(server).completions.create(**settings, logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for part in parts for t in part.tokens] == lp.tokens
    assert [o for part in parts for o in part.text_offset] == lp.text_offset
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text


BAD = [
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
    ("chat", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"100000": 1}}, "logit_bias"),  # beyond the vocabulary
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("chat", {"min_p": 1.5}, "min_p"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
]


@pytest.mark.parametrize(("route", "fields", "param"), BAD)
def test_bad_sampling_values_get_an_openai_shaped_400(server, route, fields, param):
    body = {"model": "tiny", "max_tokens": 2, **fields}
    body.update({"messages": HELLO} if route == "chat" else {"prompt": "hi"})
    path = "chat/completions" if route == "chat" else "completions"
    answer = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param) and error["message"]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_a_text_chunk_event_is_the_chunk_the_dicts_make(chat):
    """The streaming fast path (a chunk with text only) sends exactly the JSON of the general path."""
    from loramux.server.api.openai import _Shape, _sse, _with_usage

    shape = _Shape("chatcmpl-x", "acme/support", chat)
    for text in ("Paris", 'a "quote"\n\\ é 🚀', " "):
        for usage in (True, False):
            fast = shape.text_event(3, text, usage)
            assert fast.startswith("data: ") and fast.endswith("\n\n")
            assert json.loads(fast[6:]) == json.loads(_sse(_with_usage(shape.chunk(3, text, None), usage))[6:])
