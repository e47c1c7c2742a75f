"""The serving app of an API process: the OpenAI-compatible routes, the hub routes (local registry), `/metrics`,
`/health` and `/ready` on one port; a request id and one structured log line per request; a uvicorn server whose
SIGTERM lets requests in flight finish within a grace period and then ends their streams cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loramux import __version__
from loramux.server.api.errors import install_handlers
from loramux.server.api.fine_tuning import fine_tuning_router
from loramux.server.api.limits import BodyLimit
from loramux.server.api.openai import openai_router
from loramux.server.api.state import ServerState

access_log = logging.getLogger("loramux.access")

# Paths whose requests are counted by status in the metrics (a bounded label set: never the raw path).
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}
_QUIET = {"/health", "/ready", "/metrics"}  # polled by orchestrators: no log line each time
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(state: ServerState) -> RequestLog:
    """The ASGI app for `state`; the model loads in the background once the server starts."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loading = asyncio.ensure_future(state.load())
        yield
        loading.cancel()
        await asyncio.to_thread(state.close)

    app = FastAPI(title="loramux", version=__version__, lifespan=lifespan)
    app.state.loramux = state
    install_handlers(app)
    app.include_router(openai_router())
    app.include_router(fine_tuning_router())

    @app.get("/health")
    def health() -> JSONResponse:
        failure = state.engine_failure()
        if failure is not None:  # the engine process is gone: this server cannot answer, and says so
            return JSONResponse({"status": "engine_dead", "error": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    def ready() -> JSONResponse:
        failure = state.engine_failure()
        if state.engine is not None and failure is None and not state.draining:
            return JSONResponse({"status": "ready", "model": state.base_id})
        if failure is not None:
            status, error = "engine_dead", failure
        else:
            status = "failed" if state.load_error else "shutting_down" if state.draining else "loading"
            error = state.load_error
        return JSONResponse({"status": status, "error": error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(await state.engine_stats()), media_type=CONTENT_TYPE_LATEST)

    if state.settings.hub_url is None:
        from loramux.registry.hub import hub_router

        app.include_router(hub_router(state.registry))
    return RequestLog(BodyLimit(app, set(ENDPOINTS)), state)


class RequestLog:
    """ASGI wrapper: gives each request an id (the client's `x-request-id` if sane, else a new one), returns it as
    `x-request-id`, counts inference requests by status and logs one JSON line when the response has been sent
    (for a stream: when it ended). Routes add fields (model, tenant, usage) to `request.state.log`."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        fields: dict = {}
        scope.setdefault("state", {}).update(request_id=request_id, log=fields)
        status, started = 500, time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = scope["path"]
            if path in ENDPOINTS:
                self.state.metrics.observe_request(ENDPOINTS[path], status, elapsed)
            if path not in _QUIET:
                line = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                    **fields,
                }
                access_log.info(json.dumps(line, default=str))


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting connections, answer new requests on open connections with 503, give those
    in flight the grace period, abort what still runs (its streams end with `[DONE]`), then stop uvicorn."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.loramux_state = state

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        await self.loramux_state.drain()
        await super().shutdown(sockets)


def serve(state: ServerState, host: str, port: int, sockets: list | None = None) -> int:
    """Run the server until a signal (or a failed model load) stops it; returns the exit status. `sockets`: a
    listening socket shared by several API processes (else it binds `host:port`)."""
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(state.settings.shutdown_grace) + 10,
    )
    server = GracefulServer(config, state)
    failed: list[BaseException] = []

    def stop_on_failure(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    state.on_load_failure = stop_on_failure
    # uvicorn re-raises the signal that stopped it once it has shut down; after a graceful SIGTERM shutdown the
    # process should end with status 0, not die of the signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise ValueError(f"could not load the base model: {failed[0]}")
    return 0
