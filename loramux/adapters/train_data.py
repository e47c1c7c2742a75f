"""Training data for a run: chat conversations (read and checked by `loramux.core.chat_data`) split for validation,
rendered with the base's chat template, tokenized with the loss on assistant tokens only, and optionally packed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loramux.core.chat_data import DataError, Messages

IGNORE_INDEX = -100  # the label of a token that takes no part in the loss (torch's cross_entropy ignore_index)


def split_validation(
    conversations: Sequence[Messages], fraction: float, seed: int
) -> tuple[list[Messages], list[Messages]]:
    """(train, validation): a seeded random `fraction` of the conversations held out, at least one of each."""
    if fraction <= 0:
        return list(conversations), []
    if len(conversations) < 2:
        raise DataError("a validation split needs at least 2 examples")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, round(fraction * len(conversations))), len(conversations) - 1)
    validation = {*order[:held_out]}
    return (
        [c for i, c in enumerate(conversations) if i not in validation],
        [c for i, c in enumerate(conversations) if i in validation],
    )


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # the token id where it is learned, IGNORE_INDEX elsewhere; same length as input_ids

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_conversation(tokenizer: Any, messages: Messages, max_seq_len: int) -> TokenizedExample:
    """Render with the tokenizer's chat template and label only the assistant turns (content + end-of-turn token).

    The turns are found in the rendered text and mapped to tokens through the fast tokenizer's character offsets,
    so the tokens are exactly those of the whole rendered conversation (tokenizing turn by turn can split
    differently at the seams). Longer conversations are cut to `max_seq_len` tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the base model's tokenizer has no chat template, so chat data cannot be rendered")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("training needs a fast (Rust) tokenizer for the base model")
    text = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False
    )
    spans = _assistant_spans(text, messages, tokenizer.eos_token)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoded["input_ids"])[:max_seq_len]
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, (start, end) in enumerate(encoded["offset_mapping"][: len(input_ids)]):
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[i] = input_ids[i]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def _assistant_spans(text: str, messages: Messages, eos_token: str | None) -> list[tuple[int, int]]:
    # Walk the rendered text message by message, so an assistant reply that repeats an earlier user message is
    # still found at its own place. Templates may trim content, hence the search for the stripped text.
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        content = message["content"].strip()
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            raise DataError(f"the chat template does not render message {index} ({message['role']}) verbatim")
        end = start + len(content)
        if message["role"] == "assistant" and message["weight"]:
            if eos_token and text.startswith(eos_token, end):
                end += len(eos_token)  # learn to end the turn, so generation stops
            spans.append((start, end))
        cursor = end
    return spans


def tokenize_dataset(
    tokenizer: Any, conversations: Sequence[Messages], max_seq_len: int
) -> tuple[list[TokenizedExample], int]:
    """(examples, dropped): conversations whose learned tokens were all cut off by `max_seq_len` are dropped."""
    examples = [tokenize_conversation(tokenizer, messages, max_seq_len) for messages in conversations]
    kept = [e for e in examples if e.loss_tokens > 0]
    return kept, len(examples) - len(kept)


@dataclass
class Row:
    """One row of a batch: one example, or several packed end to end (positions restart at each example)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)

    def add(self, example: TokenizedExample) -> None:
        self.input_ids += example.input_ids
        self.labels += example.labels
        self.position_ids += range(len(example.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def build_rows(examples: Sequence[TokenizedExample], max_seq_len: int, packing: bool) -> list[Row]:
    """One row per example, or with `packing` whole examples packed first-fit-decreasing into rows of at most
    `max_seq_len` tokens. Examples are never split, so each keeps its own positions and (through the restarting
    positions) its own attention."""
    if not packing:
        rows = []
        for example in examples:
            rows.append(Row())
            rows[-1].add(example)
        return rows
    rows: list[Row] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        row = next((r for r in rows if len(r) + len(example.input_ids) <= max_seq_len), None)
        if row is None:
            row = Row()
            rows.append(row)
        row.add(example)
    return rows
