"""Tokens as OpenAI's logprobs show them: text and UTF-8 bytes for byte-level BPE and SentencePiece tokenizers, and
the chat and completions shapes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from loadtests.tiny_model import write_tiny_tokenizer
from loramux.server.api.logprobs import TokenStrings, chat_content, completion_logprobs
from loramux.server.engine.request import TokenLogprobs


def test_byte_level_tokens_give_back_their_bytes(tmp_path):
    write_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    strings = TokenStrings(tokenizer)
    assert strings.byte_level
    ids = tokenizer("é!", add_special_tokens=False)["input_ids"]  # é is two bytes, two tokens here
    pieces = [strings(i) for i in ids]
    assert pieces == [("\ufffd", [0xC3]), ("\ufffd", [0xA9]), ("!", [0x21])]
    assert bytes(b for _, raw in pieces for b in raw).decode() == "é!"
    assert strings(tokenizer.convert_tokens_to_ids("<|im_end|>")) == ("<|im_end|>", list(b"<|im_end|>"))
    assert strings(10_000) == ("", [])  # an id past the tokenizer's vocabulary (a model's padded rows)


def test_sentencepiece_tokens_give_back_spaces_and_fallback_bytes():
    vocab = {"<unk>": 0, "\u2581the": 1, "cat": 2, "<0xE2>": 3, "<0x82>": 4, "<0xAC>": 5, "é": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    strings = TokenStrings(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert not strings.byte_level
    assert strings(1) == (" the", list(b" the")) and strings(2) == ("cat", list(b"cat"))
    assert [strings(i)[1] for i in (3, 4, 5)] == [[0xE2], [0x82], [0xAC]]  # the euro sign, a byte a token
    assert strings(6) == ("é", list("é".encode()))  # a character outside ASCII is its UTF-8, not one Latin-1 byte


def test_chat_and_completion_shapes(tmp_path):
    write_tiny_tokenizer(tmp_path)
    strings = TokenStrings(AutoTokenizer.from_pretrained(str(tmp_path)))
    a, b = ord("a") - ord("!"), ord("b") - ord("!")  # the tiny vocabulary starts at "!"
    lps = [TokenLogprobs(-0.5, [(a, -0.5), (b, -1.5)]), TokenLogprobs(-2.0, [(a, -0.1)])]
    assert chat_content(strings, [a, b], lps) == [
        {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "b", "logprob": -1.5, "bytes": [98]}]},
        {"token": "b", "logprob": -2.0, "bytes": [98], "top_logprobs": [
            {"token": "a", "logprob": -0.1, "bytes": [97]}]},
    ]  # fmt: skip
    shape, offset = completion_logprobs(strings, [a, b], lps, offset=7)
    assert shape == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"a": -0.5, "b": -1.5}, {"a": -0.1, "b": -2.0}],  # the chosen token's always there
        "text_offset": [7, 8],
    }
    assert offset == 9
