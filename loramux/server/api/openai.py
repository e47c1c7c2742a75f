"""The OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/completions` (each streaming as server-sent
events or not) and `GET /v1/models`. `model` names the base (as /v1/models shows it, or its directory name) or an
adapter repo `ns/name[@revision]` that the caller's tenant may read.

Sampling settings a request leaves out take the base's generation_config.json values (temperature, top_p, top_k,
min_p, repetition_penalty), as vLLM does, else OpenAI's defaults; a chat completion without max_tokens may generate
`ServerSettings.default_max_tokens` tokens (`loramux serve --default-max-tokens`; the base's max_new_tokens where
smaller), a text completion OpenAI's 16, and neither past the context length."""

# No `from __future__ import annotations`: FastAPI must see the route signatures' real types.
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loramux.core.adapter_source import AdapterRef
from loramux.registry.registry import Caller
from loramux.server.api.auth import caller_of
from loramux.server.api.errors import APIError, model_not_found
from loramux.server.api.generation import Choice, Generation
from loramux.server.api.logprobs import TokenStrings, chat_content, completion_logprobs, token_strings
from loramux.server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from loramux.server.api.state import ServerState
from loramux.server.engine.request import RequestOutput, SamplingParams

Who = Annotated[Caller, Depends(caller_of)]
DISCONNECT_POLL_SECONDS = 0.25

# The delta of a chat stream's first chunk per choice, sent before any token (as OpenAI sends it).
ROLE_DELTA = {"role": "assistant", "content": ""}


def openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    def list_models(request: Request, who: Who) -> dict:
        return {"object": "list", "data": _models(_state(request), who)}

    @router.get("/models/{model:path}")
    def retrieve_model(request: Request, model: str, who: Who) -> dict:
        for card in _models(_state(request), who):
            if card["id"] == model:
                return card
        raise model_not_found(model)

    @router.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest, who: Who) -> Response:
        messages = [{"role": _ROLES.get(m.role, m.role), "content": m.text()} for m in body.messages]
        inputs = [(0, {"messages": messages})] * body.n
        return await _complete(request, body, who, inputs, body.token_limit, chat=True)

    @router.post("/completions")
    async def completions(request: Request, body: CompletionRequest, who: Who) -> Response:
        inputs = []
        for index, prompt in enumerate(body.prompts()):
            given = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}
            inputs += [(index, given)] * body.n
        return await _complete(request, body, who, inputs, body.max_tokens, chat=False)

    return router


_ROLES = {"developer": "system"}  # chat templates know "system"; OpenAI's newer name for it is "developer"


def _state(request: Request) -> ServerState:
    return request.app.state.loramux


def _models(state: ServerState, who: Caller) -> list[dict]:
    state.require_engine()
    cards = [
        {
            "id": state.base_id,
            "object": "model",
            "created": state.created,
            "owned_by": "loramux",
            "root": state.base_id,
            "parent": None,
        }
    ]
    if state.settings.hub_url is None:  # a remote hub's listing is the hub's business (`adapters ls`)
        for view in state.registry.list_repos(who, kind="adapter"):
            cards.append(
                {
                    "id": view.repo.repo_id,
                    "object": "model",
                    "created": int(view.head.created_at),
                    "owned_by": view.repo.namespace,
                    "root": view.repo.repo_id,
                    "parent": state.base_id,
                }
            )
    return cards


def _adapter_of(state: ServerState, model: str) -> str | None:
    """None for the base; the adapter name otherwise (404 for what cannot be a model name at all)."""
    if model in state.base_names:
        return None
    try:
        AdapterRef.parse(model)
    except ValueError:
        raise model_not_found(model) from None
    return model


def _sampling(body: SamplingFields, max_tokens: int, defaults: dict[str, float | int], choice: int) -> SamplingParams:
    """The engine's parameters for choice `choice`: the request's, else the base's `defaults`, else OpenAI's."""

    def given(name: str, fallback: float) -> float:
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)

    # With a seed, choice i samples with seed + i: reproducible, yet the n choices differ.
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=given("temperature", 1.0),
        top_p=given("top_p", 1.0),
        top_k=max(0, int(given("top_k", 0))),
        min_p=given("min_p", 0.0),
        repetition_penalty=given("repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=body.token_bias,
        logprobs=body.logprobs_count,
        seed=None if body.seed is None else body.seed + choice,
        stop=list(body.stop or []),
        ignore_eos=body.ignore_eos,
    )


def _default_max_tokens(state: ServerState, chat: bool, defaults: dict[str, float | int]) -> int:
    """max_tokens for a request that gives none: OpenAI's 16 for text completions; for chat the server's cap, or the
    base's max_new_tokens where smaller. The engine ends a sequence at the context length in any case."""
    if not chat:
        return 16
    cap = state.settings.default_max_tokens or state.info.max_model_len
    return min(cap, int(defaults.get("max_new_tokens", cap)))


async def _complete(
    request: Request,
    body: SamplingFields,
    who: Caller,
    inputs: list[tuple[int, dict]],
    max_tokens: int | None,
    *,
    chat: bool,
) -> Response:
    state = _state(request)
    state.require_engine()
    adapter = _adapter_of(state, body.model)
    request_id = request.state.request_id
    request.state.log.update(model=body.model, tenant=who.tenant, n=len(inputs))
    vocab = state.info.vocab_size
    if any(token >= vocab for token in body.token_bias):
        raise APIError(
            400, f"logit_bias token ids must be below the vocabulary size, {vocab}", param="logit_bias",
            code="invalid_value",
        )  # fmt: skip
    defaults = state.generation_defaults
    if max_tokens is None:
        max_tokens = _default_max_tokens(state, chat, defaults)
    params = [_sampling(body, max_tokens, defaults, i % body.n) for i in range(len(inputs))]
    generation = Generation(state, request_id, body.model, adapter, who.tenant)
    await generation.start(inputs, params, "messages" if chat else "prompt")
    logprobs = None
    if body.logprobs_count is not None:
        stop_ids = set() if body.ignore_eos else set(state.info.stop_token_ids)
        logprobs = _Logprobs(token_strings(state.inputs.tokenizer), chat, stop_ids)
    shape = _Shape(("chatcmpl-" if chat else "cmpl-") + request_id, body.model, chat, logprobs)
    if body.stream:
        events = _events(generation, shape, body.include_usage, request)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _collect_unless_disconnected(generation, request, logprobs)
    finally:
        generation.close()
    usage = generation.usage()
    request.state.log.update(usage)
    return JSONResponse(shape.final(generation, usage))


async def _collect_unless_disconnected(generation: Generation, request: Request, logprobs: "_Logprobs | None") -> None:
    """Run the generation to its end (its logprobs gathered where asked); a client that goes away meanwhile cancels it
    (close() aborts the rest)."""

    async def collect() -> None:
        async for choice, out in generation.outputs():
            if logprobs is not None:
                logprobs.add(choice, out)

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                request.state.log["disconnected"] = True
                raise APIError(499, "The client closed the connection.", code="client_closed_request")
    finally:
        task.cancel()


class _Logprobs:
    """A request's logprobs in OpenAI's shape, per output as it streams or gathered per choice for the final answer.
    The token that ended a choice (end of sequence), whose text never shows, gets no entry."""

    def __init__(self, strings: TokenStrings, chat: bool, stop_ids: set[int]) -> None:
        self.strings, self.chat, self.stop_ids = strings, chat, stop_ids
        self.offsets: dict[int, int] = {}  # choice -> characters of its text before the next token (completions)
        self.gathered: dict[int, list] = {}  # choice -> content entries, or completions' logprobs objects

    def of(self, choice: Choice, out: RequestOutput) -> dict | None:
        """The `logprobs` value of a chunk carrying `out` (None when it holds no token to show)."""
        ids, lps = out.token_ids, out.logprobs or []
        if out.finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids, lps = ids[:-1], lps[:-1]
        if not ids:
            return None
        if self.chat:
            return {"content": chat_content(self.strings, ids, lps), "refusal": None}
        shape, self.offsets[choice.index] = completion_logprobs(
            self.strings, ids, lps, self.offsets.get(choice.index, 0)
        )
        return shape

    def add(self, choice: Choice, out: RequestOutput) -> None:
        part = self.of(choice, out)
        if part is not None:
            self.gathered.setdefault(choice.index, []).append(part)

    def final(self, index: int) -> dict:
        parts = self.gathered.get(index, [])
        if self.chat:
            return {"content": [entry for part in parts for entry in part["content"]], "refusal": None}
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {key: [value for part in parts for value in part[key]] for key in keys}


class _Shape:
    """The JSON objects of OpenAI's two completion APIs."""

    def __init__(self, response_id: str, model: str, chat: bool, logprobs: _Logprobs | None = None) -> None:
        self.id, self.model, self.chat, self.created = response_id, model, chat, int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.logprobs = logprobs
        # The event of a chunk that carries text only, the common one (a token a step per request), as a template:
        # the same JSON `chunk` + `_sse` make, with the text put in, without building and encoding the dicts.
        head = json.dumps(self.chunk(0, "", None), separators=(",", ":"))
        self._text_head = head[: head.index('"choices":[') + len('"choices":[')]

    def text_event(self, index: int, text: str, include_usage: bool) -> str:
        """`_sse(_with_usage(self.chunk(index, text, None), include_usage))`, built faster."""
        body = '{"content":' + json.dumps(text) + "}" if self.chat else json.dumps(text)
        key = '"delta":' if self.chat else '"text":'
        tail = ',"usage":null}' if include_usage else "}"
        return (
            f'data: {self._text_head}{{"index":{index},{key}{body},"logprobs":null,"finish_reason":null}}],'
            f'"system_fingerprint":null{tail}\n\n'
        )

    def final(self, generation: Generation, usage: dict) -> dict:
        choices = []
        for c in generation.choices:
            text = "".join(c.text)
            item = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            logprobs = self.logprobs.final(c.index) if self.logprobs is not None else None
            choices.append({"index": c.index, **item, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    def chunk(
        self, index: int, text: str | None, finish: str | None, first: bool = False, logprobs: dict | None = None
    ) -> dict:
        if self.chat:
            delta = dict(ROLE_DELTA) if first else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "system_fingerprint": None,
        }


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(generation: Generation, shape: _Shape, include_usage: bool, request: Request) -> AsyncIterator[str]:
    """The server-sent events of a streaming answer. A client that disconnects cancels this generator (Starlette
    watches for it), and `finally` aborts the engine requests still running."""
    try:
        if shape.chat:
            for choice in generation.choices:
                yield _sse(_with_usage(shape.chunk(choice.index, None, None, first=True), include_usage))
        try:
            async for choice, out in generation.outputs():
                logprobs = shape.logprobs.of(choice, out) if shape.logprobs is not None else None
                if out.text and not logprobs and not out.finished:
                    yield shape.text_event(choice.index, out.text, include_usage)
                    continue
                if not shape.chat:
                    if out.text or out.finished or logprobs:
                        chunk = shape.chunk(choice.index, out.text, out.finish_reason, logprobs=logprobs)
                        yield _sse(_with_usage(chunk, include_usage))
                    continue
                if out.text or logprobs:
                    yield _sse(_with_usage(shape.chunk(choice.index, out.text, None, logprobs=logprobs), include_usage))
                if out.finished:
                    yield _sse(_with_usage(shape.chunk(choice.index, None, out.finish_reason), include_usage))
        except APIError as exc:  # the engine stopped mid-stream: say so in OpenAI's streaming error shape
            request.state.log["error"] = exc.message
            yield _sse(exc.body())
            return
        usage = generation.usage()
        request.state.log.update(usage)
        if include_usage:
            yield _sse({**shape.chunk(0, None, None), "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        if any(c.finish_reason is None for c in generation.choices):
            request.state.log["disconnected"] = True
        generation.close()


def _with_usage(chunk: dict, include_usage: bool) -> dict:
    # With include_usage every chunk carries "usage": null, and one last chunk carries the totals.
    return {**chunk, "usage": None} if include_usage else chunk
