"""What an API process holds while it runs: its handle on the engine (started in the background, so that `/health`
answers at once and `/ready` turns 200 once the engine serves), the tokenizer side of requests, the registry, the
metrics and the requests in flight (so that a graceful shutdown can let them finish, then end them cleanly).

The engine runs in a process of its own (`loramux.server.engine.core`). The API process that starts it owns it and
stops it last; with `--api-servers N` the parent starts it and each API process attaches to it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    data_dir: Path | None = None  # the registry's (where adapters come from without `hub_url`)
    database_url: str | None = None  # the registry's metadata on PostgreSQL instead of SQLite under data_dir
    blob_url: str | None = None  # the registry's blobs in an S3 bucket instead of data_dir/blobs
    hub_url: str | None = None  # a remote hub as the adapter source instead of the local registry
    hub_token: str | None = None
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    log_level: int = logging.WARNING
    quantize: str = "auto"  # the base's decoder weights: "nf4", "none", or "auto" (none for a merged checkpoint)
    default_max_tokens: int = 1024  # a chat completion's max_tokens when it gives none (0: up to the context length)

    def core_spec(self):
        """What the engine process loads, with the adapter source it opens there."""
        from functools import partial

        from loramux.registry.source import HubSource, registry_source
        from loramux.server.engine.core import CoreSpec

        source = (
            partial(HubSource, self.hub_url, self.hub_token)
            if self.hub_url
            else partial(registry_source, self.data_dir, self.database_url, self.blob_url)
        )
        return CoreSpec(self.base, self.device, self.engine, source, self.log_level, self.quantize)

    def open_registry(self) -> Registry:
        return Registry.open(self.data_dir, self.database_url, self.blob_url)


@dataclass
class Attachment:
    """An engine already running (started by the parent of several API processes)."""

    address: str
    info: object  # EngineInfo
    dead: object  # the parent's event, set when the engine process dies


@dataclass
class ServerState:
    settings: ServerSettings
    registry: Registry
    attach: Attachment | None = None  # None: this process starts (and stops) the engine
    metrics: Metrics = field(init=False)
    engine: object = None  # EngineClient once the engine serves
    inputs: object = None  # InputProcessor (tokenizer, context length)
    info: object = None  # EngineInfo
    # the base's generation_config.json sampling settings: the defaults of a request that gives none
    generation_defaults: dict = field(default_factory=dict)
    process: object = None  # EngineProcess, where this process started it
    base_names: set[str] = field(default_factory=set)  # what `model` may say to mean the base
    base_id: str = ""  # the name /v1/models shows
    load_error: str | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # request id -> the engine request ids it runs, for the shutdown's final abort
    in_flight: dict[str, list[str]] = field(default_factory=dict)
    on_load_failure: Callable[[BaseException], None] = lambda exc: None

    def __post_init__(self) -> None:
        self.metrics = Metrics()

    # -- loading ---------------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Start the engine process (or attach to the parent's), then the tokenizer side; on failure, say why on
        `/ready` and call `on_load_failure`."""
        try:
            from loramux.server.engine.client import EngineClient
            from loramux.server.engine.core import EngineProcess

            started = time.perf_counter()
            if self.attach is None:
                self.process = EngineProcess.start(self.settings.core_spec())
                info = await asyncio.to_thread(self.process.wait_ready)
                self.attach = Attachment(self.process.address, info, self.process.dead)
            if self.inputs is None:
                await asyncio.to_thread(self.prepare)
            client = EngineClient(self.attach.address, self.info, self.inputs.tokenizer, dead=self.attach.dead)
            await client.connect()
            self.engine = client
            for note in self.info.notes:
                log.info("%s", note)
            log.info("model %s ready in %.1fs", self.base_id, time.perf_counter() - started)
        except BaseException as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the base model failed: %s", self.load_error)
            self.on_load_failure(exc)

    def prepare(self) -> None:
        """The tokenizer side of the attached engine's base: tokenizer, names, the registry's fit check."""
        from transformers import AutoTokenizer

        from loramux.server.engine.inputs import InputProcessor
        from loramux.server.models.checkpoint import load_generation_defaults

        info = self.attach.info
        tokenizer = AutoTokenizer.from_pretrained(info.path)
        self.inputs = InputProcessor(tokenizer, info.vocab_size, info.max_model_len)
        self.info = info
        path = Path(info.path)
        self.generation_defaults = load_generation_defaults(path)
        self.base_id = path.name if Path(info.name).is_dir() else info.name
        self.base_names = {info.name, path.name, str(path), self.base_id}
        if self.settings.hub_url is None:  # pushes to this server's hub must fit what it serves
            self.registry.adapter_checks.append(_base_fit_check(path))

    def require_engine(self):
        """The engine client, or a 503 while the model loads, after a failed load, once the engine process died, or
        while the server shuts down."""
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
        if self.engine.dead:
            raise APIError(
                503,
                f"The engine is not running: {self.engine.failure}",
                type="server_error",
                code="engine_stopped",
                headers={"Retry-After": "5"},
            )
        return self.engine

    def engine_failure(self) -> str | None:
        """Why the engine is gone, once it is (None while it serves or loads)."""
        return self.engine.failure if self.engine is not None else None

    async def engine_stats(self) -> dict[str, float]:
        if self.engine is None or self.engine.dead:
            return {}
        return await self.engine.stats()

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
            self.engine.close()
        if self.process is not None:
            self.process.stop()
            log.info("engine stopped")


def _base_fit_check(path: Path) -> Callable:
    """The registry check that refuses adapters whose shapes the base in `path` cannot serve. Ranks are left to the
    registry's limit: another server on the same registry may serve higher ones."""
    from functools import partial

    from loramux.core.validate import check_fits_base
    from loramux.server.models.checkpoint import load_config
    from loramux.server.models.lora_weights import base_shapes

    config = load_config(path)
    return partial(check_fits_base, shapes=base_shapes(config), num_layers=config.num_hidden_layers)
