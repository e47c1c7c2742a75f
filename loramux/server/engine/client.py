"""The API process's side of the engine: it submits requests of token ids to the engine process and turns what comes
back into each request's stream of text deltas, on the asyncio loop.

    client = EngineClient(process.address, info, tokenizer, dead=process.dead)
    await client.connect()
    stream = client.submit(prompt_ids, SamplingParams(max_tokens=64), adapter="acme/support", tenant="acme")
    async for out in stream:     # RequestOutput: text delta, token ids, finish reason, counts
        ...
    stream.abort()               # the engine frees its KV blocks and slot at its next step
    await client.stats()         # the engine's counters
    client.close()

One message from the engine carries a step's new tokens for every request of this process; each request's stream
gets its outputs in order. Errors the engine raises for a request (unknown adapter, queue full, ...) end its stream:
the first `__anext__` raises them, so that the API can answer with a status before it streams. When the engine
process dies, every stream ends with EngineStoppedError and `dead` is set.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

import zmq
import zmq.asyncio

from loramux.server.engine import protocol
from loramux.server.engine.core import EngineInfo
from loramux.server.engine.errors import EngineStoppedError
from loramux.server.engine.outputs import OutputProcessor
from loramux.server.engine.protocol import ABORT, ADD, DEAD, HELLO, OUTPUTS, STATS
from loramux.server.engine.request import EngineOutput, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

DEAD_CHECK_SECONDS = 0.25
STATS_TIMEOUT_SECONDS = 10.0


class RequestStream:
    """The async iterator of one request's outputs. Raises the request's error (if any) on the item it comes as."""

    def __init__(self, client: EngineClient, request_id: str) -> None:
        self._client = client
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
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

    def ready(self) -> list[RequestOutput | BaseException]:
        """The items that came and were not read yet, without waiting (to send several tokens in one event)."""
        items = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            items.append(item)
            if isinstance(item, BaseException) or item.finished:
                self._done = True
        return items

    @property
    def done(self) -> bool:
        return self._done

    def abort(self) -> None:
        if not self._done:
            self._client.abort(self.request_id)


class EngineClient:
    def __init__(self, address: str, info: EngineInfo, tokenizer, dead=None) -> None:
        """`tokenizer`: the base's transformers tokenizer (for detokenization); `dead`: an event (multiprocessing's)
        that the engine's parent sets when the engine process dies."""
        self.address = address
        self.info = info
        self.outputs = OutputProcessor(tokenizer, set(info.stop_token_ids))
        self._dead_event = dead
        self.failure: str | None = None  # why the engine is gone, once it is
        self._streams: dict[str, RequestStream] = {}
        self._stats: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._prefix = f"{os.getpid()}-"

    async def connect(self) -> None:
        """Open the socket and start receiving (call on the event loop that will use the client)."""
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        self._socket = socket
        await socket.send(protocol.pack(HELLO))
        self._tasks = [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._watch())]

    @property
    def dead(self) -> bool:
        return self.failure is not None

    # -- requests --------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        tenant: str | None = None,
        request_id: str,
    ) -> RequestStream:
        """Send a request of token ids; its outputs come on the returned stream. Raises EngineStoppedError at once
        when the engine is gone."""
        if self.failure is not None:
            raise EngineStoppedError(self.failure)
        # request ids are made unique per API process: several may feed one engine
        wire_id = self._prefix + request_id
        if wire_id in self._streams:
            raise EngineStoppedError(f"request id {request_id!r} is already in use")
        stream = RequestStream(self, wire_id)
        self._streams[wire_id] = stream
        self.outputs.add(wire_id, params, len(prompt_ids))
        message = protocol.pack(ADD, wire_id, prompt_ids, protocol.params_to_wire(params), adapter, tenant)
        self._socket.send(message, copy=False)
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (a stream's `request_id`); the engine frees what it held at its next step."""
        if self.failure is None and request_id in self._streams:
            self._socket.send(protocol.pack(ABORT, [request_id]))

    async def stats(self) -> dict[str, float]:
        """The engine's counters (queue, running, KV blocks, slots, adapter cache); {} when it is gone."""
        if self.failure is not None:
            return {}
        token = next(self._tokens)
        future = asyncio.get_running_loop().create_future()
        self._stats[token] = future
        await self._socket.send(protocol.pack(STATS, token))
        try:
            return await asyncio.wait_for(future, STATS_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            return {}
        finally:
            self._stats.pop(token, None)

    def in_flight(self) -> int:
        return len(self._streams)

    # -- what comes back -------------------------------------------------------------------------------------

    async def _receive(self) -> None:
        socket = self._socket
        while True:
            frame = await socket.recv()
            kind, *args = protocol.unpack(frame)
            if kind == OUTPUTS:
                self._deliver(args[0])
            elif kind == STATS:
                future = self._stats.get(args[0])
                if future is not None and not future.done():
                    future.set_result(args[1])
            elif kind == DEAD:
                self._fail(args[0])
                return

    def _deliver(self, items: list) -> None:
        stopped = []
        streams, outputs = self._streams, self.outputs
        for request_id, token_ids, finish, error, logprobs in items:
            stream = streams.get(request_id)
            if stream is None:  # ended here already (a stop string, an abort)
                continue
            if error is not None:
                del streams[request_id]
                outputs.drop(request_id)
                stream.put(protocol.error_from_wire(error))
                continue
            wire_logprobs = None if logprobs is None else protocol.logprobs_from_wire(logprobs)
            out, stop = outputs.process(EngineOutput(request_id, token_ids, finish, logprobs=wire_logprobs))
            if out is None:
                continue
            stream.put(out)
            if out.finished:
                del streams[request_id]
            if stop:
                stopped.append(request_id)
        if stopped:  # the engine does not know of stop strings: it ends them now
            self._socket.send(protocol.pack(ABORT, stopped))

    async def _watch(self) -> None:
        """Watch the engine process's death (set by its parent) and end everything when it comes."""
        while self._dead_event is not None:
            if self._dead_event.is_set():
                self._fail("the engine process exited")
                return
            await asyncio.sleep(DEAD_CHECK_SECONDS)

    def _fail(self, message: str, expected: bool = False) -> None:
        if self.failure is None:
            (log.info if expected else log.error)("engine gone: %s", message)
            self.failure = message
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            self.outputs.drop(request_id)
            stream.put(EngineStoppedError(message))
        for future in self._stats.values():
            if not future.done():
                future.set_result({})

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._socket is not None:
            self._socket.close()
        self._fail("the server is shut down", expected=True)
