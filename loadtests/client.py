"""One streaming OpenAI-protocol request, timed: time to first token, token count, end-to-end latency, or why it
failed.

Error kinds (the keys of the report's `errors`):
- `http_<status>`: the server answered with a non-200 status (`http_429`, `http_503`, ...).
- `timeout`: no complete answer within the request timeout (connect, read or total).
- `connect`: the connection could not be opened.
- `disconnect`: the connection dropped, or the stream ended before `data: [DONE]`.
- `stream_error`: the server sent an error object inside the stream.
- `bad_response`: the stream was not server-sent events of JSON chunks.
- `transport`: any other failure of the HTTP client (a bad URL scheme, a proxy error).
- `cancelled`: still in flight when the run's drain deadline passed (set by the runner, not here).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from loadtests.workload import RequestPlan

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds since the run started (`perf_counter` based)."""

    index: int
    tenant: str
    model: str
    prompt_words: int
    max_tokens: int
    start: float
    end: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (last - first) / (tokens - 1), as vLLM's benchmarks."""
        if self.first_token is None or self.last_token is None or self.output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.output_tokens - 1)


class StreamFailure(Exception):
    """Ends a request with an error kind and a short message."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


def request_body(plan: RequestPlan, endpoint: str, extra_body: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": plan.model,
        "max_tokens": plan.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": plan.prompt}]
    else:
        body["prompt"] = plan.prompt
    body.update(plan.sampling)
    body.update(extra_body)
    return body


def start_record(plan: RequestPlan, t0: float) -> RequestRecord:
    """The record of `plan`, started now; `t0` is the run's start (a `perf_counter` value)."""
    return RequestRecord(
        plan.index, plan.tenant.name, plan.model, plan.prompt_words, plan.max_tokens, time.perf_counter() - t0
    )


async def send_request(
    client: httpx.AsyncClient,
    plan: RequestPlan,
    record: RequestRecord,
    *,
    endpoint: str,
    extra_body: dict[str, Any],
    timeout_s: float,
    t0: float,
) -> None:
    """Send `plan` as one streaming request and fill in `record`. The runner holds the record, so a request that
    is cancelled mid-flight still shows up in the report."""
    headers = {"Authorization": f"Bearer {plan.tenant.api_key}"} if plan.tenant.api_key else {}
    body = request_body(plan, endpoint, extra_body)
    try:
        await asyncio.wait_for(_stream(client, ENDPOINTS[endpoint], body, headers, endpoint, record, t0), timeout_s)
        record.end = time.perf_counter() - t0
    except StreamFailure as exc:
        _fail(record, exc.kind, str(exc), exc.status, t0)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        _fail(record, "timeout", f"no complete answer within {timeout_s:g} s", None, t0)
    except httpx.ConnectError as exc:
        _fail(record, "connect", str(exc) or type(exc).__name__, None, t0)
    except (httpx.ProtocolError, httpx.NetworkError) as exc:
        _fail(record, "disconnect", str(exc) or type(exc).__name__, None, t0)
    except httpx.HTTPError as exc:
        _fail(record, "transport", f"{type(exc).__name__}: {exc}", None, t0)


def _fail(record: RequestRecord, kind: str, message: str, status: int | None, t0: float) -> None:
    record.error, record.message, record.status = kind, message[:300], status
    record.end = time.perf_counter() - t0


async def _stream(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    endpoint: str,
    record: RequestRecord,
    t0: float,
) -> None:
    async with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            raise StreamFailure(f"http_{response.status_code}", _error_message(text), response.status_code)
        chunks = 0  # chunks carrying text: the token count when the server reports no usage
        done = False
        # Read to the end of the body, past `[DONE]`, as OpenAI's client does: a response left unread closes its
        # connection, and the next request would pay for a new one.
        async for line in response.aiter_lines():
            if done or not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                if not record.usage_reported:
                    record.output_tokens = chunks
                continue
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise StreamFailure("bad_response", f"not JSON: {data[:100]!r}") from None
            if not isinstance(chunk, dict):
                raise StreamFailure("bad_response", f"not a JSON object: {data[:100]!r}")
            if "error" in chunk:
                raise StreamFailure("stream_error", _error_message(json.dumps(chunk)))
            now = time.perf_counter() - t0
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
                if text:
                    chunks += 1
                    if record.first_token is None:
                        record.first_token = now
                    record.last_token = now
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
            usage = chunk.get("usage")
            if usage:
                record.usage_reported = True
                record.output_tokens = int(usage.get("completion_tokens") or 0)
                record.prompt_tokens = usage.get("prompt_tokens")
    if not done:
        raise StreamFailure("disconnect", "stream ended before data: [DONE]")


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the start of the body."""
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (json.JSONDecodeError, AttributeError):
        pass
    return text[:200] or "(empty body)"
