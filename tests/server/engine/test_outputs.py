"""From token ids to streamed text: the pieces add up to the whole output's text whatever the characters, stop
strings cut the text and end the request, a final stop token is counted but not shown."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loramux.server.engine.outputs import OutputProcessor
from loramux.server.engine.request import EngineOutput, SamplingParams

TEXTS = [
    "The capital of France is Paris.",
    "Crème brûlée, naïve café; Zürich — 東京タワー 🚀🔥 done!",
    "  leading spaces,\ttabs\nand newlines\n\n  end ",
    "<|im_end|> special tokens are skipped",
]


@pytest.fixture(scope="module")
def tokenizer(default_base_dir):
    return AutoTokenizer.from_pretrained(str(default_base_dir))


def stream(processor: OutputProcessor, ids: list[int], finish_last: str = "length") -> list:
    outs = []
    for n, token in enumerate(ids):
        last = n == len(ids) - 1
        out, stopped = processor.process(EngineOutput("r", [token], finish_last if last else None))
        if out is not None:
            outs.append((out, stopped))
    return outs


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id})
    processor.add("r", SamplingParams(max_tokens=len(ids)), prompt_tokens=3)
    outs = [out for out, _ in stream(processor, ids)]
    assert all("\ufffd" not in out.text for out in outs)  # a partial UTF-8 character is held back, never streamed
    assert "".join(out.text for out in outs) == tokenizer.decode(ids, skip_special_tokens=True)
    assert [out.completion_tokens for out in outs] == list(range(1, len(ids) + 1))
    assert outs[-1].finish_reason == "length" and outs[-1].prompt_tokens == 3 and "r" not in processor


def test_a_stop_string_cuts_the_text_and_ends_the_request(tokenizer):
    ids = tokenizer("Paris is the capital. London is not.", add_special_tokens=False)["input_ids"]
    processor = OutputProcessor(tokenizer, set())
    processor.add("r", SamplingParams(max_tokens=50, stop=["capital"]), prompt_tokens=1)
    outs = stream(processor, ids)
    text = "".join(out.text for out, _ in outs)
    assert text == "Paris is the "
    assert outs[-1][0].finish_reason == "stop" and outs[-1][1]  # the caller must abort it in the engine
    assert all(not stopped for _, stopped in outs[:-1])
    assert processor.process(EngineOutput("r", [5], None)) == (None, False)  # later tokens are ignored


def test_text_that_may_start_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    ids = tokenizer("one two three", add_special_tokens=False)["input_ids"]
    processor = OutputProcessor(tokenizer, set())
    processor.add("r", SamplingParams(max_tokens=50, stop=["two and"]), prompt_tokens=1)
    texts = [out.text for out, _ in stream(processor, ids)]
    assert "".join(texts) == "one two three"
    # " two" could have begun "two and": it is not out before "three" shows it did not
    assert not any(t.endswith("two") for t in texts)


def test_a_stop_token_is_counted_but_not_shown(tokenizer):
    ids = tokenizer("yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id})
    processor.add("r", SamplingParams(max_tokens=50), prompt_tokens=1)
    outs = [out for out, _ in stream(processor, ids, finish_last="stop")]
    assert "".join(o.text for o in outs) == "yes" and outs[-1].completion_tokens == len(ids)
    assert outs[-1].token_ids == [tokenizer.eos_token_id] and outs[-1].finish_reason == "stop"


def test_an_abort_hands_out_what_was_held_back(tokenizer):
    ids = tokenizer("abc", add_special_tokens=False)["input_ids"]
    processor = OutputProcessor(tokenizer, set())
    processor.add("r", SamplingParams(max_tokens=50, stop=["abcdef"]), prompt_tokens=1)
    held = [out for out, _ in stream(processor, ids, finish_last=None)]
    assert "".join(o.text for o in held) == ""  # all of it may begin the stop string
    out, stopped = processor.process(EngineOutput("r", [], "abort"))
    assert out.text == "abc" and out.finish_reason == "abort" and not stopped
