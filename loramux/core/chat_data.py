"""Chat-format training data, read and checked line by line: one `{"messages": [...]}` object a line. Imports no
torch, so an upload can be validated by a process that has none (the registry, the API)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 1 << 20

Messages = list[dict[str, Any]]


class DataError(ValueError):
    """The training data is malformed; the message names the first bad line and why."""


def parse_chat_lines(lines: Iterable[str | bytes], source: str = "data") -> list[Messages]:
    """Read `{"messages": [...]}` lines; blank lines are skipped. Raises `DataError` at the first bad line.

    Each message has a `role` (system, user or assistant) and a string `content`; an assistant message may carry
    `"weight": 0` to keep it out of the loss (as in OpenAI's fine-tuning format). Every conversation needs at least
    one assistant message with weight 1.
    """
    conversations: list[Messages] = []
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{source} line {number}: longer than {MAX_LINE_BYTES} bytes")
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{source} line {number}: not UTF-8 text ({exc.reason})") from exc
        if not line.strip():
            continue
        try:
            conversations.append(_check_conversation(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except DataError as exc:
            raise DataError(f"{source} line {number}: {exc}") from None
    if not conversations:
        raise DataError(f"{source} holds no examples: expected one JSON object per line with a 'messages' list")
    return conversations


def load_chat_jsonl(path: str | Path) -> list[Messages]:
    path = Path(path)
    try:
        with path.open("rb") as file:
            return parse_chat_lines(file, source=path.name)
    except FileNotFoundError as exc:
        raise DataError(f"training data {path} not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"training data {path} is a directory, not a JSONL file") from exc


def _check_conversation(record: Any) -> Messages:
    if not isinstance(record, dict):
        raise DataError("expected a JSON object with a 'messages' list")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    checked: Messages = []
    trained = 0
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise DataError(f"{where} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where} needs a string 'content'")
        if role == "system" and index != 0:
            raise DataError(f"{where}: a system message may only come first")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(f"{where} has weight {weight!r}; expected 0 or 1")
        if weight != 1 and role != "assistant":
            raise DataError(f"{where}: only assistant messages take a weight")
        if role == "assistant":
            if not content.strip():
                raise DataError(f"{where}: an assistant message needs non-empty content")
            trained += weight
        checked.append({"role": role, "content": content, "weight": weight})
    if trained == 0:
        raise DataError("no assistant message to learn from (at least one with weight 1 is needed)")
    return checked
