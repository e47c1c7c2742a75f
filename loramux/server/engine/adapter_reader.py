"""Adapter reads in processes of their own, straight into the shared host arena.

An adapter read on a thread of the serving process (a fetch thread of `adapter_cache`) runs its Python (config,
header, checks, views) under the GIL and takes the GIL back after each of its torch calls and reads; the step loop
releases the GIL at every kernel launch and then waits to get it back. On an H200 the first round of W2's requests
ran its mixed steps twice as long as the same steps of the second round, whose adapters had been read beforehand:
the step thread waited 60-200 ms a step beside two reads. A `ReaderPool` moves the
reads into reader processes. Each maps the CPU cache's arena (`HostArena(shared=True)`, a memory file), and a read,
from a fetch thread, goes:

1. the fetch thread sends the adapter's directory to an idle reader;
2. the reader checks the config and the safetensors header against the base (`plan_lora`) and answers with the
   plan (which gives the bytes the adapter takes), or with the error;
3. the fetch thread carves those bytes from the arena (evicting as before) and answers with the offset;
4. the reader reads the tensors into that region and checks them (`fill_lora`), and answers done or the error;
5. the fetch thread makes the views over the region (`LoraPlan.weights_over`).

The fetch thread waits for the answers with the GIL released; its own Python is two small messages and the views.
An adapter that does not fit in the arena at all (step 3 answers None) is read by the fetch thread itself, as before.
A reader that dies, or breaks off, is replaced by a new one; the read fails with `AdapterReaderError`, unless the
reader was found dead before it took the adapter (it died idle), in which case the new one reads it.

A reader is `python -m loramux.server.engine.adapter_reader SOCKET_FD ARENA_FD CAPACITY`: a new interpreter that
imports torch and the adapter code (never CUDA), given one end of a socket pair and the arena's memory file.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import queue
import signal
import site
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

import loramux
from loramux.core.adapter_config import AdapterConfigError
from loramux.core.model_config import ModelConfig
from loramux.server.engine.host_arena import HostArena
from loramux.server.models.lora_weights import LoraWeights, fill_lora, load_lora, plan_lora

log = logging.getLogger(__name__)

# (offset in the arena, the region as a uint8 tensor) for a number of bytes; offset None: not in the arena
Allocate = Callable[[int], tuple[int | None, torch.Tensor]]


@dataclass(frozen=True)
class ReadSpec:
    """How adapters are read into the CPU cache: checked against `base`, in `dtype` (the slot memory's), with B
    rank-major (Bᵀ, as slot memory holds it) or as the file holds it (`SlotWriter.b_rank_major` decides), by torch
    calls on `cpu_threads` CPU threads (None: torch's default, every core)."""

    base: ModelConfig | None
    dtype: torch.dtype
    b_rank_major: bool = False
    cpu_threads: int | None = None

    def read(self, path: Path, allocate: Callable[[int], torch.Tensor]) -> LoraWeights:
        """Read the adapter in `path` on this thread into a buffer from `allocate` (see `load_lora`)."""
        return load_lora(path, self.base, self.dtype, allocate, b_rank_major=self.b_rank_major)


class AdapterReaderError(RuntimeError):
    """A reader process failed: it died, or met an error that is not the adapter's (the message says which)."""


@dataclass
class _Reader:
    process: subprocess.Popen
    conn: Connection
    ready: bool = False  # its "ready" (torch imported, the arena mapped) was received


class ReaderPool:
    """`processes` reader processes over `arena` (shared), reading as `spec` says: `read` is called from any thread,
    one read per reader at a time (a caller waits for an idle one)."""

    def __init__(self, processes: int, arena: HostArena, spec: ReadSpec) -> None:
        if arena.fd is None:
            raise ValueError("reader processes need a shared arena (HostArena(..., shared=True))")
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.arena = arena
        # What every read needs, sent to each reader once when it starts
        self._setup = (spec.base, str(spec.dtype).removeprefix("torch."), spec.b_rank_major, spec.cpu_threads)
        self.spec = spec
        self._idle: queue.SimpleQueue[_Reader] = queue.SimpleQueue()
        self._readers: list[_Reader] = []
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0
        for _ in range(processes):
            self._idle.put(self._start())

    def _start(self) -> _Reader:
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), self.arena.fd)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(fds[0]), str(fds[1]), str(self.arena.capacity)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=_reader_env(),
            )
        finally:
            theirs.close()
        reader = _Reader(process, Connection(ours.detach()))
        with contextlib.suppress(OSError):  # it exited already: found out when it is first waited for (`_await_ready`)
            reader.conn.send(self._setup)
        with self._lock:
            self._readers.append(reader)
        return reader

    def read(self, path: Path, allocate: Allocate) -> LoraWeights:
        """Read the adapter in `path` into a region from `allocate`, checked against the base. Raises what
        `load_lora` raises (`AdapterConfigError` and its kinds), or `AdapterReaderError`. A reader found dead before
        it took the path (it died while idle) is replaced and the read tried once more, on the new one."""
        for attempt in (1, 2):
            if self._closed:
                raise AdapterReaderError("the adapter reader processes are shut down")
            if not self.processes:
                raise AdapterReaderError("no adapter reader process is running (none could be started again)")
            reader = self._idle.get()
            in_step, answered = True, False  # in_step: False once the reader waits for the next path again
            try:
                try:
                    if not reader.ready:
                        self._await_ready(reader)
                    reader.conn.send(str(path))
                    reply = reader.conn.recv()
                    answered = True
                    if reply[0] == "error":
                        in_step = False
                        raise reply[1]
                    plan = reply[1]
                    offset, region = allocate(plan.nbytes(self.spec.dtype))
                    reader.conn.send(offset)
                    if offset is None:  # not in the arena: read here
                        in_step = False
                        return fill_lora(plan, region, self.spec.dtype, self.spec.b_rank_major)
                    reply = reader.conn.recv()
                    in_step = False
                except (EOFError, OSError) as exc:
                    if not answered and attempt == 1:
                        continue
                    raise AdapterReaderError(f"the adapter reader process failed reading {path}: {exc!r}") from exc
                if reply[0] == "error":
                    raise reply[1]
                return plan.weights_over(region, self.spec.dtype, self.spec.b_rank_major)
            finally:
                self._give_back(reader, healthy=not in_step)
        raise AssertionError("unreachable")

    @property
    def processes(self) -> int:
        """Reader processes running (or starting)."""
        with self._lock:
            return len(self._readers)

    @staticmethod
    def _await_ready(reader: _Reader) -> None:
        if reader.conn.recv() != ("ready",):
            raise EOFError("the reader answered out of turn")
        reader.ready = True

    def wait_ready(self) -> None:
        """Wait until every reader has started (a new interpreter importing torch: seconds), so that the first reads
        do not wait for that. Raises `AdapterReaderError` naming a reader that exited instead."""
        taken = [self._idle.get() for _ in range(self.processes)]
        try:
            for reader in taken:
                if not reader.ready:
                    try:
                        self._await_ready(reader)
                    except (EOFError, OSError) as exc:
                        code = reader.process.wait()
                        raise AdapterReaderError(
                            f"an adapter reader process exited as it started (exit code {code}; its error is on stderr)"
                        ) from exc
        finally:
            for reader in taken:
                self._idle.put(reader)

    def _give_back(self, reader: _Reader, healthy: bool) -> None:
        if healthy and not self._closed:
            self._idle.put(reader)
            return
        self._stop(reader)
        with self._lock:
            if reader in self._readers:
                self._readers.remove(reader)
            if not self._closed:
                self.restarts += 1
        if not self._closed:  # a reader stopped mid-read is replaced (the region it wrote to is given back after)
            log.warning("adapter reader process %d stopped (exit code %s); starting another", reader.process.pid,
                        reader.process.returncode)  # fmt: skip
            try:
                self._idle.put(self._start())
            except OSError:  # the pool has one reader fewer; with none left, reads fail at once
                log.exception("starting an adapter reader process failed")

    @staticmethod
    def _stop(reader: _Reader, timeout: float = 0.0) -> None:
        reader.conn.close()  # the reader sees the end of its input and exits
        try:
            reader.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            reader.process.kill()
            reader.process.wait()

    def close(self) -> None:
        """Stop every reader (each ends once it sees its input closed; one that does not within 5 s is killed)."""
        self._closed = True
        with self._lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            self._stop(reader, timeout=5.0)


def _reader_env() -> dict[str, str]:
    """This process's environment, with the directory loramux was imported from first on the path where that is not
    a site directory (a source checkout), so that the reader imports the same loramux."""
    env = dict(os.environ)
    root = Path(loramux.__file__).resolve().parent.parent
    sites = {Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages())}
    if root not in sites:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def _portable(exc: BaseException) -> BaseException:
    """The error to send back: the adapter's own error as it is, anything else as an `AdapterReaderError`."""
    if isinstance(exc, AdapterConfigError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # an error that does not pickle: its text
            return AdapterConfigError(str(exc))
    return AdapterReaderError(f"reading the adapter failed: {type(exc).__name__}: {exc}")


def serve(conn: Connection, arena_fd: int, capacity: int) -> None:
    """A reader's loop: a directory in, the plan out, an offset in (None: skip), done out; until the input ends."""
    base, dtype_name, b_rank_major, cpu_threads = conn.recv()
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    dtype = getattr(torch, dtype_name)
    arena = torch.frombuffer(mmap.mmap(arena_fd, capacity), dtype=torch.uint8)
    conn.send(("ready",))
    while True:
        try:
            path = conn.recv()
        except EOFError:
            return
        try:
            plan = plan_lora(Path(path), base)
        except Exception as exc:
            conn.send(("error", _portable(exc)))
            continue
        conn.send(("plan", plan))
        offset = conn.recv()
        if offset is None:
            continue
        try:
            fill_lora(plan, arena[offset:], dtype, b_rank_major)
        except Exception as exc:
            conn.send(("error", _portable(exc)))
            continue
        conn.send(("done",))


def main(argv: list[str] | None = None) -> int:
    socket_fd, arena_fd, capacity = (int(x) for x in (argv if argv is not None else sys.argv[1:]))
    # Ctrl-C in a terminal reaches the whole process group: the serving process shuts down, and the reader ends
    # when it sees its input closed (also if the serving process dies)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the serving process went away
        serve(Connection(socket_fd), arena_fd, capacity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
