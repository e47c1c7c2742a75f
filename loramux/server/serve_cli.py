"""`loramux serve`: the OpenAI-compatible API, the adapter hub and /metrics on one port, over one base model (NF4,
or a merged checkpoint in bf16)."""

from __future__ import annotations

import argparse
import os

from loramux.registry.cli.common import add_data_dir_argument
from loramux.registry.cli.hub import is_loopback

MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", default=None, help="base model: a Hugging Face directory or hub id (default: SmolLM2-135M-Instruct)"
    )
    add_quantize_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_data_dir_argument(parser)
    parser.add_argument(
        "--hub",
        default=None,
        metavar="URL",
        help="serve adapters from this remote hub (loramux or huggingface.co) instead of the local registry",
    )
    parser.add_argument("--hub-token", default=None, help="token for --hub (default: $LORAMUX_TOKEN, then $HF_TOKEN)")
    parser.add_argument(
        "--slots",
        type=int,
        default=4,
        help="adapter slot memory on the device: this many adapters of --max-lora-rank at once, more of lower rank "
        "(paged by rank 8 where --max-lora-rank is a multiple of 8: eight rank-8 adapters take one rank-64 slot; "
        "default 4)",
    )
    parser.add_argument("--max-lora-rank", type=int, default=64, help="highest adapter rank served (default 64)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded in one batch (default 32)")
    parser.add_argument(
        "--max-queue", type=int, default=1024, help="requests waiting beyond the batch before 429 (default 1024)"
    )
    parser.add_argument(
        "--adapter-cache-mb",
        type=int,
        default=2048,
        help="CPU cache of adapter weights in MiB, in the compute dtype, allocated at start (bf16 and page-locked on "
        "a GPU; default 2048)",
    )
    parser.add_argument(
        "--adapter-readers",
        type=int,
        default=None,
        help="processes that read adapters into the CPU cache, beside the serving process (default: 2 on a GPU, where "
        "reads on its own threads would hold up the step loop; 0 on the CPU: read on threads)",
    )
    parser.add_argument(
        "--overlap-outputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream each step's outputs while the next step computes (more tokens/s, each output one step later) "
        "or before it starts (default: overlap on a GPU, not on the CPU)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the base's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds requests in flight get to finish on SIGTERM before their streams are ended (default 30)",
    )
    parser.add_argument(
        "--allow-insecure-no-auth",
        action="store_true",
        help="listen on a non-loopback address even though no API keys exist (anyone could use the server)",
    )


QUANTIZE_HELP = (
    "how the base's decoder linear weights are held: nf4 (4-bit NF4 with double quantization, about 0.52 bytes a "
    "weight), none (unquantized in the compute dtype: bf16 on a GPU, 2 bytes a weight; fp32 on the CPU), or auto: "
    "none for a checkpoint written by `adapters merge` (NF4 again can erase what the adapter learned), nf4 for any "
    "other base (default auto)"
)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["auto", "nf4", "none"], default="auto", help=QUANTIZE_HELP)


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("slots", "max_queue", "adapter_cache_mb", "adapter_readers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("max_lora_rank", "max_num_seqs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.shutdown_grace < 0:
        raise ValueError("--shutdown-grace must not be negative")


def run(args: argparse.Namespace) -> int:
    import logging

    _check(args)
    from loramux.registry.registry import Registry, collect_garbage_periodically

    registry = Registry.open(args.data_dir)  # API keys (and, without --hub, the adapters) live here
    collect_garbage_periodically(registry)  # uploads never committed, partial uploads, unused xorbs
    keys = registry.store.has_keys()
    if not keys and not is_loopback(args.host) and not args.allow_insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {args.host} with no API keys (single-user mode lets anyone use the server); "
            "create one with `loramux tenants create NAME` and `loramux keys create NAME`, "
            "or pass --allow-insecure-no-auth"
        )

    from loramux.server.api.app import serve
    from loramux.server.api.state import ServerSettings, ServerState
    from loramux.server.engine.engine import EngineConfig

    engine = EngineConfig(
        num_slots=args.slots,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        adapter_cache_bytes=args.adapter_cache_mb * MiB,
        adapter_reader_processes=args.adapter_readers,
        overlap_outputs=args.overlap_outputs,
        max_model_len=args.max_model_len,
    )
    hub_token = args.hub_token or os.environ.get("LORAMUX_TOKEN") or os.environ.get("HF_TOKEN")
    if args.hub:
        from loramux.registry.source import HubSource

        source = HubSource(args.hub, hub_token)
    else:
        from loramux.registry.source import RegistrySource

        source = RegistrySource(registry)
    settings = ServerSettings(
        base=args.base,
        device=args.device,
        engine=engine,
        hub_url=args.hub,
        hub_token=hub_token,
        shutdown_grace=args.shutdown_grace,
        quantize=args.quantize,
    )
    logging.getLogger("loramux.access").setLevel(logging.INFO)
    logging.getLogger("loramux.server.api.state").setLevel(logging.INFO)
    logging.getLogger("loramux.server.models.loader").setLevel(logging.INFO)  # says how the base's weights are held
    mode = "API keys required" if keys else "single-user mode (no API keys)"
    adapters = f"adapters from {args.hub}" if args.hub else "adapters from the local registry"
    print(f"loramux serve on http://{args.host}:{args.port} ({mode}; {adapters}); loading the model...", flush=True)
    return serve(ServerState(settings, registry, source), args.host, args.port)
