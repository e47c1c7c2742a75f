"""Starting the real `loramux serve` in a subprocess on a free loopback port, for the API and end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import REPO, free_port


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL if it hangs, so that tests never leak a server)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def serve_command(*args: str, command: tuple[str, ...] = ("serve",)) -> list[str]:
    return [sys.executable, "-m", "loramux.cli", *command, *args]


def launch(
    home: Path,
    *args: str,
    ready_timeout: float = 180,
    env: dict[str, str] | None = None,
    command: tuple[str, ...] = ("serve",),
) -> Server:
    """Start `loramux serve ARGS` (or another `command` that serves, such as `cluster serve`) with LORAMUX_HOME=home
    and wait until /ready answers 200 (`env` overrides)."""
    port = free_port()
    # One compute thread: on a CPU shared with other test processes, torch's spinning thread pool is much slower.
    inherited = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}  # as users run it
    env = {**inherited, "LORAMUX_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    log = home / f"serve-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            serve_command("--port", str(port), *args, command=command),
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loramux {' '.join(command)} exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"loramux {' '.join(command)} was not ready within {ready_timeout}s:\n{server.output()}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in `text` (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sample, _, label_text = series.partition("{")
        if sample == name and ",".join(sorted(label_text.rstrip("}").split(","))) == want:
            return float(value)
    return 0.0
