"""The OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/completions` (each streaming as server-sent
events or not) and `GET /v1/models`. `model` names the base (as /v1/models shows it, or its directory name) or an
adapter repo `ns/name[@revision]` that the caller's tenant may read."""

# No `from __future__ import annotations`: FastAPI must see the route signatures' real types.
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loramux.adapters.source import AdapterRef
from loramux.registry.registry import Caller
from loramux.server.api.auth import caller_of
from loramux.server.api.errors import APIError, model_not_found
from loramux.server.api.generation import Generation
from loramux.server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from loramux.server.api.state import ServerState
from loramux.server.engine.request import SamplingParams

Who = Annotated[Caller, Depends(caller_of)]
DISCONNECT_POLL_SECONDS = 0.25


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


def _sampling(body: SamplingFields, max_tokens: int | None, default_max: int, choice: int) -> SamplingParams:
    # With a seed, choice i samples with seed + i: reproducible, yet the n choices differ.
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=None if body.seed is None else body.seed + choice,
        stop=list(body.stop or []),
        ignore_eos=body.ignore_eos,
    )


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
    default_max = state.info.max_model_len
    params = [_sampling(body, max_tokens, default_max, i % body.n) for i in range(len(inputs))]
    generation = Generation(state, request_id, body.model, adapter, who.tenant)
    await generation.start(inputs, params, "messages" if chat else "prompt")
    shape = _Shape(("chatcmpl-" if chat else "cmpl-") + request_id, body.model, chat)
    if body.stream:
        events = _events(generation, shape, body.include_usage, request)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _collect_unless_disconnected(generation, request)
    finally:
        generation.close()
    usage = generation.usage()
    request.state.log.update(usage)
    return JSONResponse(shape.final(generation, usage))


async def _collect_unless_disconnected(generation: Generation, request: Request) -> None:
    """Run the generation to its end; a client that goes away meanwhile cancels it (close() aborts the rest)."""
    task = asyncio.ensure_future(generation.collect())
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


class _Shape:
    """The JSON objects of OpenAI's two completion APIs."""

    def __init__(self, response_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat, self.created = response_id, model, chat, int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def final(self, generation: Generation, usage: dict) -> dict:
        choices = []
        for c in generation.choices:
            text = "".join(c.text)
            item = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": c.index, **item, "logprobs": None, "finish_reason": c.finish_reason})
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
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
                if not shape.chat:
                    if out.text or out.finished:
                        yield _sse(_with_usage(shape.chunk(choice.index, out.text, out.finish_reason), include_usage))
                    continue
                if out.text:
                    yield _sse(_with_usage(shape.chunk(choice.index, out.text, None), include_usage))
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
