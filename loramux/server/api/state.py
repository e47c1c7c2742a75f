"""What the serving app holds while it runs: the base model and engine (loaded in the background, so `/health`
answers at once and `/ready` turns 200 when the model is in), the registry, the metrics and the requests in flight
(so that a graceful shutdown can let them finish, then end them cleanly)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loramux.adapters.source import AdapterSource
from loramux.registry.registry import Registry
from loramux.server.api.errors import APIError
from loramux.server.api.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """How `loramux serve` was started; `engine` is an `EngineConfig` (typed loosely: this module imports no torch)."""

    base: str | None = None  # directory, hub id or None for the default model
    device: str | None = None
    engine: object = None
    hub_url: str | None = None  # a remote hub as the adapter source instead of the local registry
    hub_token: str | None = None
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    quantize: str = "auto"  # the base's decoder weights: "nf4", "none", or "auto" (none for a merged checkpoint)


@dataclass
class ServerState:
    settings: ServerSettings
    registry: Registry
    source: AdapterSource
    metrics: Metrics = field(init=False)
    engine: object = None  # AsyncEngine once loaded
    base_names: set[str] = field(default_factory=set)  # what `model` may say to mean the base
    base_id: str = ""  # the name /v1/models shows
    load_error: str | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # request id -> the engine request ids it runs, for the shutdown's final abort
    in_flight: dict[str, list[str]] = field(default_factory=dict)
    on_load_failure: Callable[[BaseException], None] = lambda exc: None

    def __post_init__(self) -> None:
        self.metrics = Metrics(engine_stats=self.engine_stats)

    def engine_stats(self) -> dict[str, float]:
        return self.engine.stats() if self.engine is not None else {}

    # -- loading ---------------------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load the base and start the engine on a background thread."""
        thread = threading.Thread(target=self._load, name="loramux-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            from loramux.server.engine.engine import AsyncEngine, EngineConfig
            from loramux.server.models.loader import load_base

            started = time.perf_counter()
            base = load_base(self.settings.base, device=self.settings.device, quantize=self.settings.quantize)
            engine = AsyncEngine.start(base, source=self.source, config=self.settings.engine or EngineConfig())
            self.base_id = base.path.name if Path(base.name).is_dir() else base.name
            self.base_names = {base.name, base.path.name, str(base.path), self.base_id}
            if self.settings.hub_url is None:  # pushes to this server's hub must fit what it serves
                self.registry.adapter_checks.append(_base_fit_check(base.config))
            self.engine = engine
            log.info("model %s ready in %.1fs", self.base_id, time.perf_counter() - started)
        except BaseException as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the base model failed: %s", self.load_error)
            self.on_load_failure(exc)

    def require_engine(self):
        """The engine, or a 503 while the model loads, after a failed load, or while the server shuts down."""
        if self.draining:
            raise APIError(
                503,
                "The server is shutting down.",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "5"},
            )
        if self.engine is None:
            message = f"The model failed to load: {self.load_error}" if self.load_error else "The model is loading."
            raise APIError(503, message, type="server_error", code="model_not_ready", headers={"Retry-After": "5"})
        return self.engine

    # -- shutdown --------------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse new requests, give those in flight `shutdown_grace` seconds, then abort the rest: their streams
        end with finish_reason "abort" and `[DONE]` rather than a cut connection."""
        self.draining = True
        deadline = time.monotonic() + self.settings.shutdown_grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight and self.engine is not None:
            log.warning("shutdown: aborting %d requests still running after the grace period", len(self.in_flight))
            for ids in list(self.in_flight.values()):
                for request_id in ids:
                    self.engine.abort(request_id)
            deadline = time.monotonic() + 5
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            log.info("engine stopped")


def _base_fit_check(config) -> Callable:
    """The registry check that refuses adapters whose shapes `config`'s base (a ModelConfig) cannot serve. Ranks
    are left to the registry's limit: another server on the same registry may serve higher ones."""
    from functools import partial

    from loramux.adapters.validate import check_fits_base
    from loramux.adapters.weights import base_shapes

    return partial(check_fits_base, shapes=base_shapes(config), num_layers=config.num_hidden_layers)
