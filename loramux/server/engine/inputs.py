"""From what a client sends to the token ids the engine runs: a text prompt, token ids, or chat messages rendered with
the base's chat template; checked against the vocabulary and the context length. Runs on the API side of the engine
(and in `LLMEngine.generate`), so that the engine's loop never tokenizes."""

from __future__ import annotations

from loramux.server.engine.errors import ContextLengthError, InvalidRequestError
from loramux.server.models.loader import chat_prompt_ids


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        """`tokenizer`: the base's transformers tokenizer; `max_model_len`: the engine's context length."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def prompt_ids(
        self,
        *,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> list[int]:
        """The token ids of exactly one of `prompt`, `prompt_ids` or `messages`; raises InvalidRequestError (empty,
        ids outside the vocabulary, no chat template) or ContextLengthError (no room left to generate a token)."""
        if sum(x is not None for x in (prompt, prompt_ids, messages)) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_ids or messages")
        if messages is not None:
            ids = self.chat_prompt_ids(messages)
        elif prompt is not None:
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt_ids or [])
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.max_model_len - 1
        if len(ids) > limit:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; this model's context allows at most {limit} prompt tokens"
            )
        return ids

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered with the base's chat template, ready for the assistant's turn."""
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise InvalidRequestError("messages must be a list of {role, content} objects with string values")
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
