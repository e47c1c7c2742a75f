"""Training data: line-by-line validation, assistant-only labels through the chat template, packing, splits."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from loramux.adapters.train_data import (
    IGNORE_INDEX,
    TokenizedExample,
    build_rows,
    split_validation,
    tokenize_conversation,
    tokenize_dataset,
)
from loramux.core.chat_data import DataError, load_chat_jsonl, parse_chat_lines


def chat(*turns: tuple[str, str], **extra) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **extra})


GOOD = chat(("user", "hi"), ("assistant", "hello"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from loadtests.tiny_model import write_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "x"}', "'messages' must be a non-empty list"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        (chat(("user", "hi"), ("robot", "beep")), "message 1 has role 'robot'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "message 0 needs a string 'content'"),
        (chat(("user", "hi")), "no assistant message to learn from"),
        (chat(("user", "hi"), ("assistant", "  ")), "needs non-empty content"),
        (chat(("user", "hi"), ("system", "late"), ("assistant", "x")), "a system message may only come first"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}',
            "weight 2",
        ),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}', "no "),
    ],
)
def test_the_first_bad_line_is_named_with_the_reason(line, reason):
    # Line 3 is bad; line 2 is blank (skipped but still counted) and line 4, also bad, is never reached.
    with pytest.raises(DataError) as info:
        parse_chat_lines([GOOD, "", line, "{bad"], source="train.jsonl")
    assert str(info.value).startswith("train.jsonl line 3: ")
    assert reason in str(info.value)


def test_bytes_that_are_not_utf8_and_empty_files_are_refused(tmp_path: Path):
    with pytest.raises(DataError, match=r"data line 2: not UTF-8"):
        parse_chat_lines([GOOD.encode(), b"\xff\xfe{}"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl holds no examples"):
        load_chat_jsonl(empty)
    with pytest.raises(DataError, match="not found"):
        load_chat_jsonl(tmp_path / "missing.jsonl")


def test_a_valid_file_loads_every_conversation(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + "\n" + chat(("system", "be brief"), ("user", "q"), ("assistant", "a")) + "\n")
    conversations = load_chat_jsonl(path)
    assert [[m["role"] for m in c] for c in conversations] == [["user", "assistant"], ["system", "user", "assistant"]]


def learned_text(tokenizer, example: TokenizedExample) -> list[str]:
    """The learned tokens decoded, one string per contiguous learned run."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_only_assistant_turns_and_their_end_of_turn_are_learned(tokenizer):
    # The user says exactly what the assistant later says: the label must still land on the assistant's turn.
    messages = parse_chat_lines(
        [
            chat(
                ("system", "You are terse."),
                ("user", "Say ok."),
                ("assistant", "ok"),
                ("user", "ok"),
                ("assistant", "Fine, ok again."),
            )
        ]
    )[0]
    example = tokenize_conversation(tokenizer, messages, max_seq_len=512)
    assert learned_text(tokenizer, example) == ["ok<|im_end|>", "Fine, ok again.<|im_end|>"]
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    rendered = tokenizer.apply_chat_template(plain, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered  # the whole conversation is the input


def test_an_assistant_turn_with_weight_zero_is_context_only(tokenizer):
    line = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "wrong", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "right"},
            ]
        }
    )
    example = tokenize_conversation(tokenizer, parse_chat_lines([line])[0], max_seq_len=512)
    assert learned_text(tokenizer, example) == ["right<|im_end|>"]


def test_long_conversations_are_cut_and_those_left_with_nothing_to_learn_are_dropped(tokenizer):
    short = parse_chat_lines([chat(("user", "q"), ("assistant", "yes"))])[0]
    long = parse_chat_lines([chat(("user", "x" * 200), ("assistant", "yes"))])[0]
    examples, dropped = tokenize_dataset(tokenizer, [short, long], max_seq_len=64)
    assert dropped == 1
    assert len(examples) == 1 and learned_text(tokenizer, examples[0]) == ["yes<|im_end|>"]
    cut = tokenize_conversation(tokenizer, long, max_seq_len=64)
    assert len(cut.input_ids) == len(cut.labels) == 64


def test_packing_fills_rows_with_whole_examples_and_restarts_positions(tokenizer):
    conversations = parse_chat_lines([chat(("user", "q" * n), ("assistant", "a" * n)) for n in (1, 5, 9, 30, 2)])
    examples, _ = tokenize_dataset(tokenizer, conversations, max_seq_len=80)
    rows = build_rows(examples, max_seq_len=80, packing=True)
    assert len(rows) < len(examples)
    assert all(len(row) <= 80 for row in rows)
    # Every example is in exactly one row, whole, and its positions count from 0.
    assert sorted(len(e.input_ids) for e in examples) == sorted(
        n for row in rows for n in _segment_lengths(row.position_ids)
    )
    assert sum(row.labels.count(IGNORE_INDEX) for row in rows) == sum(e.labels.count(IGNORE_INDEX) for e in examples)
    unpacked = build_rows(examples, max_seq_len=80, packing=False)
    assert [r.input_ids for r in unpacked] == [e.input_ids for e in examples]


def _segment_lengths(positions: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    assert all(positions[i] == i - start for start, end in itertools.pairwise(starts) for i in range(start, end))
    return [end - start for start, end in itertools.pairwise(starts)]


def test_validation_split_is_seeded_and_keeps_both_sides_non_empty():
    conversations = parse_chat_lines([chat(("user", str(i)), ("assistant", str(i))) for i in range(10)])
    train, validation = split_validation(conversations, 0.2, seed=3)
    assert len(train) == 8 and len(validation) == 2
    assert split_validation(conversations, 0.2, seed=3) == (train, validation)
    assert sorted(c[0]["content"] for c in train + validation) == [str(i) for i in range(10)]
    assert len(split_validation(conversations[:2], 0.01, seed=0)[1]) == 1
    assert split_validation(conversations, 0.0, seed=0) == (conversations, [])
    with pytest.raises(DataError, match="at least 2 examples"):
        split_validation(conversations[:1], 0.5, seed=0)
