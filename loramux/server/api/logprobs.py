"""Logprobs in OpenAI's two shapes. Chat: `choices[].logprobs.content[]`, one `{token, logprob, bytes, top_logprobs}`
per token. Completions: `choices[].logprobs` with `tokens`, `token_logprobs`, `top_logprobs` (a dict per token of the
top tokens and the chosen one, so up to k + 1 entries, as OpenAI's legacy API does) and `text_offset`.

A token's text is its own bytes decoded as UTF-8 (a token holding part of a character shows U+FFFD; its `bytes`
hold the real ones, which a client joins across tokens)."""

from __future__ import annotations

import json
import re
from functools import lru_cache

from loramux.server.engine.request import TokenLogprobs

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's scheme, used by Llama 3, Qwen, SmolLM): bytes that are printable
    Latin-1 characters stand for themselves; the others, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


_ALPHABET = _byte_alphabet()


class TokenStrings:
    """Token ids -> (text, UTF-8 bytes) for one tokenizer, cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _decodes_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._strings(token_id)
        return found

    def _strings(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return "", []
        if self.byte_level and all(c in _ALPHABET for c in piece):
            raw = bytes(_ALPHABET[c] for c in piece)
        elif (byte := _BYTE_TOKEN.fullmatch(piece)) is not None:  # SentencePiece's byte fallback
            raw = bytes([int(byte.group(1), 16)])
        else:  # SentencePiece marks a leading space with U+2581; added tokens are plain text
            raw = piece.replace("\u2581", " ").encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


@lru_cache(maxsize=8)
def token_strings(tokenizer) -> TokenStrings:
    """The TokenStrings of a tokenizer (one per loaded base)."""
    return TokenStrings(tokenizer)


def _decodes_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    decoders = decoder.get("decoders") or [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in decoders)


def chat_content(strings: TokenStrings, token_ids: list[int], logprobs: list[TokenLogprobs]) -> list[dict]:
    """Chat's `logprobs.content` entries for these tokens."""
    content = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text, raw = strings(token_id)
        top = []
        for other, value in lp.top:
            other_text, other_raw = strings(other)
            top.append({"token": other_text, "logprob": value, "bytes": other_raw})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return content


def completion_logprobs(
    strings: TokenStrings, token_ids: list[int], logprobs: list[TokenLogprobs], offset: int
) -> tuple[dict, int]:
    """Completions' `logprobs` object for these tokens, their text starting at character `offset` of the choice's
    text -> (the object, the offset after them)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text, _ = strings(token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top = {strings(other)[0]: value for other, value in lp.top}
        top.setdefault(text, lp.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
    shape = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs}
    return {**shape, "text_offset": text_offset}, offset
