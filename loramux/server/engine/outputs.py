"""From the engine's token ids to what a client streams, per request: text deltas decoded incrementally, stop strings
(which end a request the engine does not know has ended: the caller aborts it there), the running counts.

This runs on the API side of the engine (`client.py`), and in `LLMEngine.generate` for in-process use. Decoding is
`tokenizers`' own incremental decoder (`DecodeStream`, a few microseconds a token): it holds back a partial UTF-8
character until the token that completes it arrives, and keeps the tokenizer's leading-space and byte rules.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from loramux.server.engine.request import EngineOutput, RequestOutput, SamplingParams


def backend_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (what `DecodeStream` decodes with)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; loramux needs one (tokenizer.json)")
    return backend


class _Output:
    """One request's decoding state."""

    __slots__ = ("decoder", "ids", "params", "prompt_tokens", "sent_chars", "stop_ids", "text")

    def __init__(self, params: SamplingParams, prompt_tokens: int, stop_ids: frozenset[int]) -> None:
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.stop_ids = stop_ids
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.text = ""  # all text decoded so far (before stop-string truncation)
        self.sent_chars = 0  # characters of `text` already handed out
        self.ids: list[int] = []  # every token id of the output that is text (not a final stop token)


class OutputProcessor:
    """Turns `EngineOutput`s into `RequestOutput`s for the requests `add`ed to it."""

    def __init__(self, tokenizer, stop_token_ids: set[int]) -> None:
        """`tokenizer`: a transformers fast tokenizer; `stop_token_ids`: the base's end-of-sequence ids."""
        self.tokenizer = backend_tokenizer(tokenizer)
        self.base_stop_ids = frozenset(stop_token_ids)
        self._requests: dict[str, _Output] = {}

    def add(self, request_id: str, params: SamplingParams, prompt_tokens: int) -> None:
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.base_stop_ids)
        self._requests[request_id] = _Output(params, prompt_tokens, stop_ids)

    def drop(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def process(self, out: EngineOutput) -> tuple[RequestOutput | None, bool]:
        """(what the request streams now, or None for a request not added or already ended; True when a stop string
        ended it here, so that the engine must be told to abort it). An error ends the request; the caller raises it.
        """
        state = self._requests.get(out.request_id)
        if state is None:
            return None, False
        ids = out.token_ids
        finish = out.finish_reason
        completion_tokens = len(state.ids) + len(ids)
        # a stop token ends the request and is counted, but is never part of the text
        text_ids = ids[:-1] if finish == "stop" and ids and ids[-1] in state.stop_ids else ids
        state.ids += text_ids
        for token in text_ids:
            piece = state.decoder.step(self.tokenizer, token)
            if piece:
                state.text += piece
        if finish is not None:
            # the decoder holds back bytes that are not (yet) a whole UTF-8 character: at the end they go out as
            # they decode (U+FFFD for what never became one)
            whole = self.tokenizer.decode(state.ids, skip_special_tokens=True)
            if len(whole) > len(state.text) and whole.startswith(state.text):
                state.text = whole
        text, stopped = state.text, False
        stops = state.params.stop
        if stops:
            # only text not handed out yet can hold a new match: what was handed out was checked (and held back) before
            found = [text.find(s, max(0, state.sent_chars - len(s) + 1)) for s in stops]
            hits = [i for i in found if i >= 0]
            if hits:
                text, finish, stopped = text[: min(hits)], "stop", True
            elif finish is None:
                # hold back what may be the start of a stop string
                text = text[: max(state.sent_chars, len(text) - max(len(s) for s in stops) + 1)]
        delta = text[state.sent_chars :]
        state.sent_chars = len(text)
        if finish is not None:
            del self._requests[out.request_id]
        result = RequestOutput(
            out.request_id, delta, list(ids), finish, state.prompt_tokens, completion_tokens, out.logits, out.logprobs
        )
        return result, stopped
