"""What a deployment of loramux replicas on Ray Serve runs (`ClusterSpec`): the options of `loramux serve` for each
replica's engine and API, and how many replicas there are and how Ray Serve routes to them. It is the `args` of the
Ray Serve application (`loramux.cluster.app:build`), so every field is a plain value that a YAML config file holds,
and `from_dict` refuses what it does not know. Importing it imports neither Ray nor torch."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

QUANTIZE_CHOICES = ("auto", "nf4", "none")


@dataclass
class ClusterSpec:
    """One Ray Serve application of loramux: `replicas` engines behind one ingress. The engine options mean what they
    mean for `loramux serve`; None means that command's default (which may depend on the device)."""

    replicas: int = 1
    base: str | None = None  # directory (on every node), hub id, or None for the default model
    quantize: str = "auto"
    device: str | None = None  # "cuda": one GPU per replica; "cpu"; None: a GPU each where the Ray cluster has GPUs
    cpus_per_replica: float = 1.0  # CPUs Ray reserves for each replica (its API side and engine process)
    # The registry every replica shares; None: the replica's LORAMUX_DATABASE_URL / LORAMUX_BLOB_URL, else SQLite and
    # blobs in `data_dir` (which then must be one directory of one machine).
    data_dir: str | None = None
    database_url: str | None = None
    blob_url: str | None = None
    hub: str | None = None  # a remote hub as the adapter source instead of the registry (token: LORAMUX_TOKEN)
    slots: int | None = None
    max_lora_rank: int = 64
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_queue: int = 1024
    adapter_cache_mb: int = 2048
    adapter_readers: int | None = None
    overlap_outputs: bool | None = None
    max_model_len: int | None = None
    default_max_tokens: int = 1024
    shutdown_grace: float = 30.0
    log_level: str = "WARNING"
    # Routing: the adapters a replica counts as held (Ray Serve's max_num_models_per_replica; None: its engine's
    # slots) and the requests it takes at once before requests for its adapters spill to other replicas (None: two
    # batches, twice max_num_seqs).
    adapters_per_replica: int | None = None
    max_ongoing_requests: int | None = None
    ingress_replicas: int = 1

    def __post_init__(self) -> None:
        positive = ("replicas", "ingress_replicas", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens",
                    "adapters_per_replica", "max_ongoing_requests", "max_model_len")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name in ("slots", "max_queue", "adapter_cache_mb", "adapter_readers", "default_max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a whole number, not negative, got {value!r}")
        for name in ("cpus_per_replica", "shutdown_grace"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number, not negative, got {value!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda (each replica gets one GPU of its own), got {self.device!r}")
        if self.overlap_outputs is not None and not isinstance(self.overlap_outputs, bool):
            raise ValueError(f"overlap_outputs must be true or false, got {self.overlap_outputs!r}")
        if not isinstance(logging.getLevelName(str(self.log_level).upper()), int):
            raise ValueError(f"log_level must be a logging level (DEBUG, INFO, WARNING, ...), got {self.log_level!r}")
        self.engine_config()  # the engine's own checks (slot layout, ...)

    @classmethod
    def from_dict(cls, args: dict | None) -> ClusterSpec:
        """The spec that a Ray Serve config file's `args` (or `loramux cluster serve`) describes."""
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            listed = ", ".join(sorted(known))
            raise ValueError(f"unknown loramux cluster setting(s): {', '.join(unknown)} (known: {listed})")
        return cls(**args)

    def to_dict(self) -> dict:
        """The settings that differ from the defaults (what a config file needs to say)."""
        defaults = ClusterSpec()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)}  # fmt: skip

    def engine_config(self):
        """The EngineConfig of each replica's engine (the fields are named as `loramux serve`'s options)."""
        from loramux.server.serve_cli import engine_config

        return engine_config(self)

    def server_settings(self, device: str | None):
        """The ServerSettings of one replica, on `device`; storage and tokens left unset here come from the replica's
        environment, as for `loramux serve`."""
        from loramux.server.api.state import ServerSettings

        return ServerSettings(
            base=self.base,
            device=device,
            engine=self.engine_config(),
            data_dir=Path(self.data_dir) if self.data_dir else None,
            database_url=self.database_url or os.environ.get("LORAMUX_DATABASE_URL") or None,
            blob_url=self.blob_url or os.environ.get("LORAMUX_BLOB_URL") or None,
            hub_url=self.hub,
            hub_token=os.environ.get("LORAMUX_TOKEN") or os.environ.get("HF_TOKEN"),
            shutdown_grace=self.shutdown_grace,
            log_level=logging.getLevelName(self.log_level.upper()),
            quantize=self.quantize,
            default_max_tokens=self.default_max_tokens,
        )

    def batch_size(self, gpu: bool) -> int:
        """max_num_seqs as the engine will fit it to its device."""
        from loramux.server.engine.config import CPU_DEFAULTS, GPU_DEFAULTS

        return self.max_num_seqs or (GPU_DEFAULTS if gpu else CPU_DEFAULTS)["max_num_seqs"]
