"""The engine: one NF4 base, many adapters per batch, continuous batching. The API the HTTP layer uses.

    engine = AsyncEngine.start(load_base(...), source=registry_source, config=EngineConfig(num_slots=8))
    stream = engine.submit(messages=[{"role": "user", "content": "hi"}], adapter="acme/support",
                           params=SamplingParams(max_tokens=64, temperature=0.7, seed=1), tenant="acme")
    async for out in stream:            # RequestOutput: text delta, token_ids delta, finish_reason,
        ...                             #   prompt_tokens, completion_tokens
    engine.abort(request_id)            # frees its KV blocks and slot at the next step boundary
    engine.stats()                      # flat {name: number}: queue, running, slots, adapter cache, KV blocks
    engine.shutdown()

`submit` takes exactly one of `prompt` (text), `prompt_ids` or `messages` (rendered with the base's chat template),
an adapter name (`ns/name` or `ns/name@rev`, None for the base), `SamplingParams`, a tenant (None in single-user
mode) and an optional request id. It raises at once for what it can check without I/O: `InvalidRequestError`
(ValueError) for bad parameters, `ContextLengthError` for a prompt longer than the context, `QueueFullError` when
overloaded, `EngineStoppedError` after shutdown. What needs the adapter source is raised by the stream's first
`__anext__`: `AdapterNotFoundError` for an unknown (or unreadable) adapter, `AdapterConfigError` (for example
`AdapterMismatchError`, `AdapterTooLargeError`) for one that does not fit the base. A caller that wants to answer
with an error status before streaming awaits the first item before it starts the response.

The step loop runs on a background thread (torch releases the GIL) and hands outputs to asyncio with
`call_soon_threadsafe`. Adapter resolution, disk reads and slot loads run on the adapter cache's threads, so
they never stall the running batch. `LLMEngine` (`llm_engine.py`, re-exported here) is the same engine driven
synchronously (`step()`/`generate()`), for the command line, benchmarks and tests.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from loramux.adapters.source import AdapterSource
from loramux.server.engine.errors import EngineStoppedError
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine, merge_outputs
from loramux.server.engine.request import RequestOutput, SamplingParams
from loramux.server.models.loader import BaseModel

__all__ = ["AsyncEngine", "EngineConfig", "LLMEngine", "RequestStream", "merge_outputs"]

log = logging.getLogger(__name__)


class RequestStream:
    """The async iterator of one request's outputs. Raises the request's error (if any) on the first item."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def abort(self) -> None:
        if not self._done:
            self._engine.abort(self.request_id)


class AsyncEngine:
    """The engine for asyncio code: `submit` returns a `RequestStream`; the steps run on a background thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
        self._failure: BaseException | None = None

    @classmethod
    def start(
        cls, base: BaseModel, source: AdapterSource | None = None, config: EngineConfig | None = None
    ) -> AsyncEngine:
        engine = cls(LLMEngine(base, source, config))
        engine.engine.warm_up()  # on the GPU: kernels compiled and decode graphs captured before serving
        engine._thread.start()
        return engine

    def submit(
        self,
        *,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; call from the event loop. See the module docstring for what it raises, and when."""
        if self._stopped.is_set():
            raise EngineStoppedError("the engine is shut down") from self._failure
        loop = asyncio.get_running_loop()
        holder: list[RequestStream] = []

        def deliver(item: RequestOutput | BaseException) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(holder[0]._put, item)

        request = self.engine.make_request(
            deliver,
            prompt=prompt,
            prompt_ids=prompt_ids,
            messages=messages,
            adapter=adapter,
            params=params,
            tenant=tenant,
            request_id=request_id,
        )
        holder.append(RequestStream(self, request.request_id))
        self.engine.add(request)
        return holder[0]

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV blocks and slot are free before the next step runs."""
        self.engine.abort(request_id)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopped.is_set():
                if not engine.step():
                    engine.wait_for_work(0.5)
        except BaseException as exc:  # a failed step must not leave streams hanging
            log.exception("the engine's step loop failed")
            self._failure = exc
            self._stopped.set()
            # those still running, and those that ended with tokens not streamed yet (their last output is lost)
            for request in dict.fromkeys([*engine.requests.values(), *engine.discard_unsent()]):
                request.on_output(EngineStoppedError(f"the engine failed: {exc}"))

    def shutdown(self) -> None:
        self._stopped.set()
        self.engine._wake()
        self._thread.join(timeout=30)
        if self._failure is None and not self._thread.is_alive():
            self.engine.flush()  # the last step's tokens go out before the streams end
        for request in list(self.engine.requests.values()):
            request.on_output(EngineStoppedError("the engine is shut down"))
        self.engine.shutdown()
