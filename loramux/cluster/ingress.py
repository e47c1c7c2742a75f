"""The ingress of a deployment: the ASGI app behind Ray Serve's HTTP proxy. It reads each request, takes the adapter
that an inference request's body names (`model`) as its Ray Serve model id, and forwards the request to a replica
(`Replica.forward`) through Ray Serve's router, which prefers a replica that holds the adapter; the replica's response
streams back as it comes.

A replica that dies before the response has started costs the request nothing: the ingress sends it to another
replica. A stream starts for the client with its first token: the headers and the chat's role chunks, which a replica
sends at once, wait for it, so that a replica that dies during the prefill leaves nothing half-sent. Once the response
has started, a stream ends with an error event in OpenAI's streaming shape. Answers of the ingress's own (replicas
all busy and the queue full: 429; no replica: 503; a body over the limit: 413) are OpenAI-shaped with `Retry-After`
where waiting helps, and counted in the metrics as a server counts its own. `/metrics` adds up every replica's series
(`metrics.py`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from loramux.cluster.metrics import merge, report
from loramux.cluster.protocol import ENDPOINTS, REPLICA_HEADER, ROUTED_PATHS, ReplicaStopped, forwarded_scope, header
from loramux.core.adapter_source import AdapterRef
from loramux.server.api.errors import APIError, overloaded
from loramux.server.api.limits import BodyLimit
from loramux.server.api.metrics import Metrics
from loramux.server.api.openai import ROLE_DELTA

log = logging.getLogger(__name__)

ATTEMPTS = 4  # replicas a request is sent to, while each dies before answering
RETRY_SECONDS = 0.2  # the wait before the first retry, doubled for each later one
PROBE_PATHS = {"/health": 10.0, "/ready": 10.0}  # seconds these wait for a replica to answer before a 503
# The ingress holds every request in flight while replicas compute: its limit is far above what they take at once.
INGRESS_MAX_ONGOING = 100_000
GONE = (RayActorError, ReplicaUnavailableError, ReplicaStopped)  # a replica that will not answer this request
ROLE_CHUNK = b'"delta":' + json.dumps(ROLE_DELTA, separators=(",", ":")).encode()  # in a chat stream's first events


@serve.deployment(name="Ingress", max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # fmt: skip
@serve.ingress()
class Ingress:
    async def __init__(self, replicas, board) -> None:
        """`replicas`, `board`: the handles of the Replica and MetricsBoard deployments."""
        self.replicas, self.board = replicas, board
        self.metrics = Metrics()
        self.base_names: set[str] | None = None
        name = serve.get_replica_context().replica_id.unique_id
        self.reporter = asyncio.ensure_future(report(board, f"ingress:{name}", self._metrics_text))

    def __serve_build_asgi_app__(self):
        return _OwnAnswers(BodyLimit(_Relay(self), set(ROUTED_PATHS)), self.metrics)

    async def __del__(self) -> None:
        self.reporter.cancel()

    async def routing_key(self, path: str, body: bytes) -> str:
        """The Ray Serve model id of a request: the adapter an inference request names; "" for the base, for other
        routes and for what is no adapter name at all (routed by load alone; the replica answers it)."""
        if path not in ROUTED_PATHS:
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""
        if not isinstance(model, str) or model in await self._base_names():
            return ""
        try:
            AdapterRef.parse(model)
        except ValueError:
            return ""
        return model

    async def _base_names(self) -> set[str]:
        if self.base_names is None:
            try:
                self.base_names = set((await self.replicas.describe.remote())["base_names"])
            except Exception as exc:  # no replica yet: route by load this once
                log.warning("could not ask a replica for the base's names: %s", exc)
                return set()
        return self.base_names

    async def _metrics_text(self) -> str:
        return self.metrics.render({}).decode()


class _Relay:
    """The ASGI app that forwards each HTTP request to a replica and its response back."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            texts = await self.ingress.board.scrape.remote()
            await _send_whole(send, 200, merge(texts), CONTENT_TYPE_LATEST.encode())
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        model_id = await self.ingress.routing_key(scope["path"], body)
        handle = self.ingress.replicas.options(stream=True, multiplexed_model_id=model_id)
        forwarded = forwarded_scope(scope)
        for attempt in range(ATTEMPTS):
            response = _Response(send)
            try:
                await response.relay(handle.forward.remote(forwarded, body), PROBE_PATHS.get(scope["path"]))
                return
            except BackPressureError:
                if not response.started:
                    await _send_error(send, overloaded(retry_after=1))
                return
            except GONE as exc:
                if response.started:
                    await response.end_broken(f"the replica serving this request stopped: {_reason(exc)}")
                    return
                log.warning("a replica stopped before answering %s (attempt %d): %s", scope["path"], attempt + 1,
                            _reason(exc))  # fmt: skip
                await asyncio.sleep(RETRY_SECONDS * 2**attempt)
            except asyncio.TimeoutError:
                await _send_error(send, _unavailable("No replica answered in time."))
                return
            except Exception:
                log.exception("forwarding %s %s failed", scope["method"], scope["path"])
                if response.started:
                    await response.end_broken("the replica serving this request failed")
                else:
                    await _send_error(send, APIError(500, "Internal server error.", type="server_error"))
                return
        await _send_error(send, _unavailable(f"No replica could take the request after {ATTEMPTS} attempts."))


class _Response:
    """One attempt at relaying a replica's response: what has been sent to the client so far."""

    def __init__(self, send) -> None:
        self.send = send
        self.started = False
        self.event_stream = False
        self.complete = False

    async def relay(self, stream, first_within: float | None) -> None:
        """Send the replica's messages on; `first_within`: seconds to wait for its first batch (None: no limit)."""
        iterator = stream.__aiter__()
        try:
            if first_within is not None:
                batches = [await asyncio.wait_for(iterator.__anext__(), first_within)]
            else:
                batches = [await iterator.__anext__()]
        except StopAsyncIteration:
            return
        except BaseException:
            stream.cancel()
            raise
        held: list[dict] = []  # an event stream's start and role chunks: sent with its first token
        async for batch in _chain(batches, iterator):
            for message in batch:
                if message["type"] == "http.response.start":
                    # Ray Serve's proxy adds the request id it passed on (the client's, or its own) to every response
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                    message = {**message, "headers": headers}
                    self.event_stream = (header(message, b"content-type") or b"").startswith(b"text/event-stream")
                    if self.event_stream:
                        held.append(message)
                        continue
                elif message["type"] == "http.response.body":
                    more = message.get("more_body", False)
                    if held and more and ROLE_CHUNK in message.get("body", b""):
                        held.append(message)
                        continue
                    self.complete = not more
                await self._send([*held, message])
                held.clear()
        if held:
            await self._send(held)

    async def _send(self, messages: list[dict]) -> None:
        self.started = True  # the status and headers go to the client: no other replica can answer now
        for message in messages:
            await self.send(message)

    async def end_broken(self, reason: str) -> None:
        """End a response that a replica left half-sent: a stream with an error event (as a server whose engine
        stopped mid-stream does), any other body as it is."""
        if self.complete:
            return
        if self.event_stream:
            error = APIError(503, f"The request was cut short: {reason}.", type="server_error", code="replica_stopped")
            event = f"data: {json.dumps(error.body(), separators=(',', ':'))}\n\n".encode()
            await self.send({"type": "http.response.body", "body": event, "more_body": True})
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


async def _chain(first: list, rest):
    for item in first:
        yield item
    async for item in rest:
        yield item


class _OwnAnswers:
    """Counts the requests to the inference routes that the ingress answered itself (413, 429, 503), as a server's
    RequestLog counts its own; those a replica answered, the replica counted."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in ENDPOINTS:
            await self.app(scope, receive, send)
            return
        status, relayed, started = 500, False, time.perf_counter()

        async def watch(message) -> None:
            nonlocal status, relayed
            if message["type"] == "http.response.start":
                status, relayed = message["status"], header(message, REPLICA_HEADER) is not None
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not relayed:
                self.metrics.observe_request(ENDPOINTS[scope["path"]], status, time.perf_counter() - started)


def _unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="replica_unavailable", headers={"Retry-After": "5"})


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


async def _read_body(receive) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


async def _send_error(send, error: APIError) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    payload = json.dumps(error.body()).encode()
    await _send_whole(send, error.status, payload, b"application/json", headers)


async def _send_whole(send, status: int, payload: bytes, content_type: bytes, headers: list | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
