"""The engine in a process of its own: the step loop (schedule, run, sample) with no asyncio, no HTTP and no text,
so that nothing but the step runs on its interpreter. API processes send it token ids and receive, once a step, the
new token ids of every request they sent (`protocol.py`); tokenization, detokenization, stop strings and SSE are
theirs (`client.py`).

    process = EngineProcess.start(CoreSpec(base=None, device=None, config=EngineConfig(), source=factory))
    info = process.wait_ready()      # EngineInfo: the base, its context length, ...; raises EngineStartError
    ...                              # EngineClient(process.address, info, ...) in each API process
    process.stop()                   # the engine shuts down (adapter readers, cache), the process exits

The parent holds `process.dead`, an event set when the engine process ends without being asked to (API processes
started later get it too), so that every API process can answer 503 and end its requests instead of waiting.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from loramux.core.adapter_source import AdapterSource
from loramux.server.engine import protocol
from loramux.server.engine.protocol import ABORT, ADD, DEAD, HELLO, OUTPUTS, SHUTDOWN, STATS

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PARENT_CHECK_SECONDS = 1.0  # how long an idle engine waits for work before it checks that its parent lives


class EngineStartError(RuntimeError):
    """The engine process could not load the base or start its engine."""


@dataclass
class CoreSpec:
    """What the engine process loads. Sent to the new process, so every field must pickle: `source` is a factory
    called there (a registry opens its own database connection in the process that uses it)."""

    base: str | None  # directory, hub id or None for the default model
    device: str | None
    config: object  # EngineConfig (typed loosely: the parent need not import torch to describe it)
    source: Callable[[], AdapterSource | None] | None = None
    log_level: int = logging.WARNING
    quantize: str = "auto"  # the base's decoder weights: "nf4", "none", or "auto" (none for a merged checkpoint)


@dataclass
class EngineInfo:
    """What API processes need to know of the loaded engine."""

    name: str  # as given (--base), or the default model's name
    path: str  # the base's directory (its tokenizer and config)
    max_model_len: int
    vocab_size: int
    stop_token_ids: list[int]
    num_slots: int
    max_lora_rank: int
    device: str
    max_num_seqs: int
    max_num_batched_tokens: int
    notes: list[str] = field(default_factory=list)  # what the engine chose (printed at start)


def _make_info(engine) -> EngineInfo:
    base, config = engine.base, engine.config
    return EngineInfo(
        name=base.name,
        path=str(base.path),
        max_model_len=engine.max_model_len,
        vocab_size=base.config.vocab_size,
        stop_token_ids=sorted(engine.stop_token_ids),
        num_slots=config.num_slots,
        max_lora_rank=config.max_lora_rank,
        device=str(base.device),
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        notes=list(engine.notes),
    )


class EngineProcess:
    """The parent's handle on the engine process."""

    def __init__(self, process: multiprocessing.Process, conn, address: str, control: zmq.Socket, tmp: str):
        self.process = process
        self.address = address
        self._conn = conn
        self._control = control  # a DEALER of the parent's own, for `stop`
        self._tmp = tmp
        self.info: EngineInfo | None = None
        ctx = multiprocessing.get_context("spawn")
        self.dead = ctx.Event()  # set when the process ended without `stop`
        self._stopping = False
        self._watcher = threading.Thread(target=self._watch, name="loramux-engine-watch", daemon=True)

    @classmethod
    def start(cls, spec: CoreSpec) -> EngineProcess:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        tmp = tempfile.mkdtemp(prefix="loramux-")
        address = f"ipc://{tmp}/engine"
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_main, args=(spec, address, child_conn), name="loramux-engine", daemon=True)
        process.start()
        child_conn.close()
        control = zmq.Context.instance().socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 1000)
        control.connect(address)
        return cls(process, parent_conn, address, control, tmp)

    def wait_ready(self) -> EngineInfo:
        """Block until the engine serves (its base loaded, kernels compiled, graphs captured) -> EngineInfo; raises
        EngineStartError with the engine's own message when it could not start."""
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise EngineStartError(f"the engine process exited with status {self.process.exitcode}") from None
        if kind != "ready":
            self.process.join(30)
            raise EngineStartError(payload)
        self.info = payload
        self._watcher.start()
        return payload

    def alive(self) -> bool:
        return self.process.is_alive()

    def _watch(self) -> None:
        # Waits on the process's sentinel, without reaping it: `stop` alone joins it (two threads reaping one child
        # race, and the loser sees it as still running).
        multiprocessing.connection.wait([self.process.sentinel])
        if not self._stopping:
            self.process.join(5)  # for its exit status (nobody else reaps a process that was not asked to stop)
            log.error("the engine process exited with status %s", self.process.exitcode)
            self.dead.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the engine to shut down and wait for its process; kill it after `timeout` seconds."""
        self._stopping = True
        if self.process.is_alive():
            self._control.send(protocol.pack(SHUTDOWN))
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("the engine process did not stop within %.0f s; killing it", timeout)
                self.process.kill()
                self.process.join(5)
        self._control.close()
        for path in Path(self._tmp).glob("*"):
            path.unlink(missing_ok=True)
        Path(self._tmp).rmdir()


def _main(spec: CoreSpec, address: str, conn) -> None:
    """The engine process: load, warm up, say ready (or why not), then run the loop until told to stop."""
    logging.basicConfig(level=spec.log_level, format=LOG_FORMAT)
    logging.getLogger("loramux.server.models.loader").setLevel(logging.INFO)  # says how the base's weights are held
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see cli.run_commands
    # Ctrl-C reaches the whole process group: the parent stops the engine in order, after its requests drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from loramux.server.engine.llm_engine import LLMEngine
        from loramux.server.models.loader import load_base

        base = load_base(spec.base, device=spec.device, quantize=spec.quantize)
        engine = LLMEngine(base, spec.source() if spec.source else None, spec.config)
        engine.warm_up()
        socket = zmq.Context.instance().socket(zmq.ROUTER)
        socket.setsockopt(zmq.SNDHWM, 0)  # never drop an output because an API process is slow to read
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(address)
    except BaseException as exc:  # whatever stops the start is the parent's to report
        log.exception("the engine could not start")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        conn.close()
        raise SystemExit(1) from None
    conn.send(("ready", _make_info(engine)))
    conn.close()
    try:
        EngineCore(engine, socket).run()
    finally:
        engine.shutdown()
        socket.close()


class EngineCore:
    """The loop of the engine process: apply what the API processes sent, step, send each API process the outputs
    of its requests (during the next step's forward where `overlap_outputs`), wait when there is nothing to do."""

    def __init__(self, engine, socket: zmq.Socket) -> None:
        self.engine = engine
        self.socket = socket
        self.owners: dict[str, bytes] = {}  # request id -> the API process (its socket identity) that sent it
        self.peers: set[bytes] = set()
        self.pending: list = []  # outputs of the last step not sent yet
        self.running = True

    def run(self) -> None:
        engine = self.engine
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(engine.wake_fd, zmq.POLLIN)
        parent = os.getppid()
        send_during_step = self.send_pending if engine.overlap_outputs else None
        try:
            while self.running:
                self.receive()
                if not self.running:
                    break
                # A parent killed outright (a replica killed under load) leaves no one to read the outputs: stop
                # at the next step rather than run the batch to its end on a device a new replica may need.
                if os.getppid() != parent:
                    log.error("the serving process is gone; the engine stops")
                    return
                outputs = engine.step(send_during_step)
                self.send_pending()  # what the step did not send (no overlap, or it ran nothing)
                if outputs is None:
                    poller.poll(PARENT_CHECK_SECONDS * 1000)
                    continue
                self.pending = outputs
                if send_during_step is None:
                    self.send_pending()
        except BaseException as exc:
            log.exception("the engine's step loop failed")
            for peer in self.peers:
                self.socket.send_multipart([peer, protocol.pack(DEAD, f"the engine failed: {exc}")])
            raise

    def receive(self) -> None:
        """Apply every message waiting (adds, aborts, stats, shutdown)."""
        while True:
            try:
                peer, frame = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.peers.add(peer)
            kind, *args = protocol.unpack(frame)
            if kind == ADD:
                request_id, prompt_ids, params, adapter, tenant = args
                try:
                    self.engine.add(request_id, prompt_ids, protocol.params_from_wire(params), adapter, tenant)
                except Exception as exc:  # refused at once: the API maps the error to its status
                    item = [request_id, [], None, protocol.error_to_wire(exc), None]
                    self.socket.send_multipart([peer, protocol.pack(OUTPUTS, [item])])
                else:
                    self.owners[request_id] = peer
            elif kind == ABORT:
                for request_id in args[0]:
                    self.engine.abort(request_id)
            elif kind == STATS:
                self.socket.send_multipart([peer, protocol.pack(STATS, args[0], self.engine.stats())])
            elif kind == SHUTDOWN:
                self.running = False
            elif kind != HELLO:
                log.warning("unknown message %r from an API process", kind)

    def send_pending(self) -> None:
        """Send the last step's outputs, one message per API process."""
        if not self.pending:
            return
        by_peer: dict[bytes, list] = {}
        owners = self.owners
        for out in self.pending:
            peer = owners.get(out.request_id)
            if peer is None:
                continue
            error = None if out.error is None else protocol.error_to_wire(out.error)
            logprobs = protocol.logprobs_to_wire(out.logprobs)
            by_peer.setdefault(peer, []).append([out.request_id, out.token_ids, out.finish_reason, error, logprobs])
            if out.finished:
                del owners[out.request_id]
        self.pending = []
        for peer, items in by_peer.items():
            self.socket.send_multipart([peer, protocol.pack(OUTPUTS, items)])
