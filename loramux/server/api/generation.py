"""One HTTP completion request on its way through the engine: its `n` choices (one engine request each, tokenized
here), the engine's errors mapped to API errors before any byte is sent, the choices' outputs merged into one
stream, and the per-choice metrics. Both routes (chat and text completions) and both modes (streaming or not) use
it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loramux.core.adapter_config import AdapterConfigError
from loramux.core.adapter_source import AdapterNotFoundError
from loramux.registry.blobs import BlobError
from loramux.server.api.errors import APIError, model_not_found, overloaded
from loramux.server.api.state import ServerState
from loramux.server.engine.errors import AdapterLoadError, ContextLengthError, EngineStoppedError, QueueFullError
from loramux.server.engine.request import RequestOutput, SamplingParams


def api_error_for(exc: BaseException, model: str, prompt_param: str) -> APIError:
    """The API's answer to an engine error (raised by submit or by a stream's first item)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return model_not_found(model)
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, AdapterConfigError):
        return APIError(
            400,
            f"The adapter '{model}' cannot be served on this base: {exc}",
            param="model",
            code="adapter_incompatible",
        )
    if isinstance(exc, QueueFullError):
        return overloaded(retry_after=1)
    if isinstance(exc, EngineStoppedError):
        return APIError(
            503,
            f"The engine is not running: {exc}",
            type="server_error",
            code="engine_stopped",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, AdapterLoadError):  # the device refused the slot write (out of memory, say): try again
        return APIError(
            503,
            f"The adapter '{model}' could not be loaded for serving: {exc}",
            type="server_error",
            param="model",
            code="adapter_load_failed",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, BlobError):  # the registry's copy is missing or no longer matches its sha256
        return APIError(
            500,
            f"The adapter '{model}' cannot be loaded: its stored files are damaged ({exc}); push it again.",
            type="server_error",
            param="model",
            code="adapter_damaged",
        )
    if isinstance(exc, ValueError):  # InvalidRequestError and the tokenizer's own complaints
        return APIError(400, str(exc), code="invalid_value")
    raise exc


@dataclass
class Choice:
    """One engine request: its stream, and what it has produced so far."""

    index: int
    prompt_index: int
    stream: object  # RequestStream
    started: float
    first_token_at: float | None = None
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def record(self, out: RequestOutput) -> None:
        if out.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text.append(out.text)
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        self.finish_reason = out.finish_reason


class Generation:
    """The engine requests answering one HTTP request. `start` submits them all and awaits each one's first output
    (so that errors become a status code), `outputs` yields (choice, output) as they come, `close` aborts what is
    still running (a client that went away) and records metrics."""

    def __init__(self, state: ServerState, request_id: str, model: str, adapter: str | None, tenant: str | None):
        self.state, self.request_id, self.model, self.adapter, self.tenant = state, request_id, model, adapter, tenant
        self.choices: list[Choice] = []
        self._firsts: list[RequestOutput] = []
        self._closed = False

    async def start(self, inputs: list[tuple[int, dict]], params: list[SamplingParams], prompt_param: str) -> None:
        """Submit one engine request per (input, params) pair: `inputs[i]` is (prompt index, a dict with `prompt`,
        `prompt_ids` or `messages`). Raises APIError (and leaves nothing running) when any of them is refused."""
        engine = self.state.require_engine()
        self.state.in_flight[self.request_id] = ids = []
        try:
            tokenized: dict[int, list[int]] = {}  # n choices of one prompt share its tokens
            for i, ((prompt_index, given), sampling) in enumerate(zip(inputs, params, strict=True)):
                if prompt_index not in tokenized:
                    tokenized[prompt_index] = self.state.inputs.prompt_ids(**given)
                stream = engine.submit(
                    tokenized[prompt_index],
                    sampling,
                    adapter=self.adapter,
                    tenant=self.tenant,
                    request_id=f"{self.request_id}-{i}",
                )
                ids.append(stream.request_id)
                self.choices.append(Choice(i, prompt_index, stream, time.perf_counter()))
            self._firsts = list(await asyncio.gather(*(anext(c.stream) for c in self.choices)))
        except BaseException as exc:
            self.close(aborted=True)
            if isinstance(exc, Exception):
                raise api_error_for(exc, self.model, prompt_param) from exc
            raise

    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every choice's outputs, interleaved as the engine produces them; ends when all choices finished. Outputs
        of one choice that arrived together (a client slower than the engine) come as one."""
        if len(self.choices) == 1:
            choice, out = self.choices[0], self._firsts[0]
            while True:
                out = _coalesce(out, choice.stream)
                if isinstance(out, BaseException):
                    raise api_error_for(out, self.model, "prompt")
                choice.record(out)
                yield choice, out
                if out.finished:
                    return
                try:
                    out = await anext(choice.stream)
                except StopAsyncIteration:
                    return
                except Exception as exc:  # the engine stopped under a running request
                    raise api_error_for(exc, self.model, "prompt") from exc
        merged: asyncio.Queue[tuple[Choice, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(choice: Choice, first: RequestOutput) -> None:
            merged.put_nowait((choice, first))
            try:
                if not first.finished:
                    async for out in choice.stream:
                        merged.put_nowait((choice, out))
            except Exception as exc:  # the engine stopped under a running request
                merged.put_nowait((choice, exc))
            merged.put_nowait((choice, None))

        tasks = [asyncio.ensure_future(pump(c, f)) for c, f in zip(self.choices, self._firsts, strict=True)]
        try:
            running = len(tasks)
            while running:
                choice, item = await merged.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise api_error_for(item, self.model, "prompt")
                choice.record(item)
                yield choice, item
        finally:
            for task in tasks:
                task.cancel()

    def close(self, *, aborted: bool = False) -> None:
        """Abort the choices still running (a disconnect, or a failed start) and record metrics; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.state.in_flight.pop(self.request_id, None)
        metrics = self.state.metrics
        unfinished = [c for c in self.choices if c.finish_reason is None]
        for choice in unfinished:
            choice.stream.abort()
        if unfinished and not aborted:
            metrics.observe_abort("disconnect")
        if aborted:
            return
        now = time.perf_counter()
        for choice in self.choices:
            ttft = choice.first_token_at - choice.started if choice.first_token_at is not None else None
            metrics.observe_generation(
                tenant=self.tenant or "local",
                adapter=self.adapter or "base",
                prompt_tokens=choice.prompt_tokens,
                completion_tokens=choice.completion_tokens,
                ttft=ttft,
                total=now - choice.started,
            )
        if any(c.finish_reason == "abort" for c in self.choices) and self.state.draining:
            metrics.observe_abort("shutdown")

    async def collect(self) -> None:
        """Run every choice to its end (the non-streaming answer)."""
        async for _ in self.outputs():
            pass

    def usage(self) -> dict[str, int]:
        # The prompt is counted once per distinct prompt (n choices of one prompt share it), as OpenAI does.
        prompts = {c.prompt_index: c.prompt_tokens for c in self.choices}
        prompt_tokens, completion_tokens = sum(prompts.values()), sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


def _coalesce(first: RequestOutput, stream) -> RequestOutput | BaseException:
    """`first` and whatever else of the stream is waiting, as one output (or the error the stream ended with)."""
    waiting = stream.ready() if not first.finished else []
    if not waiting:
        return first
    items = [first]
    for item in waiting:
        if isinstance(item, BaseException):
            return item
        items.append(item)
    last = items[-1]
    logprobs = [lp for i in items for lp in (i.logprobs or [])] if any(i.logprobs for i in items) else None
    return RequestOutput(
        last.request_id,
        "".join(i.text for i in items),
        [t for i in items for t in i.token_ids],
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
        logprobs=logprobs,
    )
