"""Incremental detokenization: the streamed pieces add up to the whole output's text, whatever the characters."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loramux.server.engine.llm_engine import decode_increment

TEXTS = [
    "The capital of France is Paris.",
    "Crème brûlée, naïve café; Zürich — 東京タワー 🚀🔥 done!",
    "  leading spaces,\ttabs\nand newlines\n\n  end ",
    "<|im_end|> special tokens are skipped",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_text(default_base_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(str(default_base_dir))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        piece, prefix, read = decode_increment(tokenizer, ids[:n], prefix, read, final=n == len(ids))
        assert "\ufffd" not in piece  # a partial UTF-8 character is held back, never streamed
        pieces.append(piece)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert prefix <= read <= len(ids)
