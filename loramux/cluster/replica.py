"""One replica of a deployment: an engine process of its own and, in the replica's process, the app of `loramux serve`
(the same OpenAI routes, hub routes, tenant keys, errors and metrics), which answers the requests the ingress forwards.

Adapter affinity goes through Ray Serve's model multiplexing: the ingress gives each request the adapter it names as
its model id, and Ray Serve sends it to a replica that holds that adapter while that replica takes requests
(`max_ongoing_requests`), elsewhere when none does. A replica counts an adapter as held once it has served a request
for it (its engine has it in slot memory or its CPU cache), up to `adapters_per_replica` adapters, the least recently
used one forgotten first; the engine itself loads adapters on demand as it always does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from prometheus_client import Counter
from ray import serve

from loramux.cluster.metrics import REPLICA, report
from loramux.cluster.protocol import REPLICA_FAILED, REPLICA_HEADER, RESIDENT_HEADER, ReplicaStopped
from loramux.cluster.spec import ClusterSpec

log = logging.getLogger(__name__)

DISCONNECT_GRACE_SECONDS = 5.0  # what a request whose client went away gets to abort its engine requests
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@serve.deployment(name="Replica", health_check_period_s=5.0, logging_config={"enable_access_log": False})
class Replica:
    async def __init__(self, spec: ClusterSpec, board) -> None:
        """Start the engine (on `spec.device`, which `app.build` decided) and the app; `board`: the handle of the
        MetricsBoard deployment."""
        from loramux.registry.registry import collect_garbage_periodically
        from loramux.server.api.app import create_app
        from loramux.server.api.state import ServerState

        _configure_logging(spec.log_level)
        self.name = serve.get_replica_context().replica_id.unique_id
        settings = spec.server_settings(spec.device)
        self.state = ServerState(settings, settings.open_registry())
        await self.state.load()  # the engine process, then the tokenizer side
        if self.state.load_error is not None:
            await asyncio.to_thread(self.state.close)
            raise RuntimeError(f"{REPLICA_FAILED}could not load the base model: {self.state.load_error}")
        self.app = create_app(self.state)  # its lifespan is not run: the engine is loaded already
        self.held: dict[str, _Held] = {}
        capacity = spec.adapters_per_replica or self.state.info.num_slots or 1
        held = self.held

        async def hold(adapter: str) -> _Held:
            # Ray Serve's loader of `adapter`: the engine has loaded it already; this records that it is held.
            held[adapter] = _Held(held, adapter)
            return held[adapter]

        self.hold = serve.multiplexed(max_num_models_per_replica=capacity)(hold)
        self.routed = Counter(
            "loramux_routed_adapter_requests",
            "requests for an adapter that reached this replica, by whether it held the adapter already",
            ["resident"],
            registry=self.state.metrics.registry,
        )
        self.collector = collect_garbage_periodically(self.state.registry)
        self.reporter = asyncio.ensure_future(report(board, REPLICA + self.name, self._metrics_text))
        log.info("replica %s serves %s (holds up to %d adapters)", self.name, self.state.base_id, capacity)

    async def forward(self, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
        """Answer one HTTP request with the app -> its ASGI messages in batches. Raises ReplicaStopped, before
        anything is sent, when the engine is gone (the ingress then tries another replica)."""
        failure = self.state.engine_failure()
        if failure is not None:
            raise ReplicaStopped(f"replica {self.name}: {failure}")
        adapter = serve.get_multiplexed_model_id()
        added = [(REPLICA_HEADER, self.name.encode())]
        if adapter:
            resident = adapter in self.held
            self.routed.labels("true" if resident else "false").inc()
            added.append((RESIDENT_HEADER, b"true" if resident else b"false"))
        async for messages in run_app(self.app, scope, body):
            start = messages[0]
            if start["type"] == "http.response.start":
                messages[0] = {**start, "headers": [*start.get("headers", []), *added]}
                if adapter and start["status"] < 400:  # served: the engine holds the adapter now
                    await self.hold(adapter)
            yield messages

    async def describe(self) -> dict:
        """What the ingress needs to know of the base: the names that mean it (requests for it are not routed by
        adapter)."""
        return {"replica": self.name, "base_names": sorted(self.state.base_names)}

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose engine process died is replaced."""
        failure = self.state.engine_failure()
        if failure is not None:
            raise RuntimeError(f"the engine process of replica {self.name} is gone: {failure}")

    async def __del__(self) -> None:
        """Ray Serve's shutdown, once the requests in flight drained (`graceful_shutdown_timeout_s`); also after an
        `__init__` that failed part of the way (the engine is closed there already)."""
        if not hasattr(self, "reporter"):
            return
        self.reporter.cancel()
        self.collector.set()
        await self.state.drain()
        await asyncio.to_thread(self.state.close)

    async def _metrics_text(self) -> str:
        return self.state.metrics.render(await self.state.engine_stats()).decode()


class _Held:
    """An adapter that Ray Serve counts as held by this replica; Ray Serve calls `__del__` when it forgets it."""

    def __init__(self, held: dict[str, _Held], adapter: str) -> None:
        self.held, self.adapter = held, adapter

    def __del__(self) -> None:
        if self.held.get(self.adapter) is self:  # (the garbage collector calls it again later)
            del self.held[self.adapter]


async def run_app(app, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
    """Run the ASGI `app` on one request -> the messages it sends, in batches of those sent meanwhile. If the consumer
    stops (the client went away, and Ray Serve cancels the call), the app gets `http.disconnect` and a few seconds to
    abort its engine requests and end."""
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.put_nowait(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))  # after everything the app sent
    try:
        finished = False
        while not finished:
            batch = [await sent.get()]
            while not sent.empty():
                batch.append(sent.get_nowait())
            finished = batch[-1] is None
            messages = [message for message in batch if message is not None]
            if messages:
                yield messages
        if not task.cancelled() and task.exception() is not None:  # answered by the app's handlers already
            log.error("the app failed on %s %s", scope.get("method"), scope.get("path"), exc_info=task.exception())
    finally:
        if not task.done():
            gone.set()
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_SECONDS)
            finally:
                task.cancel()


def _configure_logging(level: str) -> None:
    """Log as `loramux serve` does: the request lines and the engine's start and stop at INFO, the rest at `level`."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    logging.getLogger("loramux").setLevel(level.upper())
    for name in ("loramux.access", "loramux.server.api.state", "loramux.cluster.replica"):
        logging.getLogger(name).setLevel(logging.INFO)
