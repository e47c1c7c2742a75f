"""`loramux serve`: the OpenAI-compatible API, the adapter hub and /metrics on one port, over one base model (NF4,
or a merged checkpoint in bf16).

The engine runs in a process of its own; the API (HTTP, tokenization, detokenization, streaming) in this one, or,
with `--api-servers N`, in N processes that share the port, this one supervising them and the engine."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from loramux.registry.cli.common import add_storage_arguments, blob_url, database_url, open_registry
from loramux.registry.cli.hub import is_loopback

MiB = 1 << 20
# A GPU's engine makes thousands of tokens a second; an API process spends tens of microseconds of Python on each
# (decoding, the event, the socket write), so a second one keeps pace where the host has the cores.
GPU_API_SERVERS = 2
GPU_API_SERVERS_MIN_CPUS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument(
        "--api-servers",
        type=int,
        default=None,
        help="processes serving HTTP (tokenization, detokenization, streaming) for the one engine process (default: "
        f"{GPU_API_SERVERS} where the engine runs on a GPU and the host has {GPU_API_SERVERS_MIN_CPUS} or more CPUs, "
        "else 1)",
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one serving engine and its API, shared by `loramux serve` and `loramux cluster serve`."""
    _add_source_arguments(parser)
    _add_capacity_arguments(parser)
    _add_runtime_arguments(parser)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """What is served (the base, how it is held, where adapters come from) and on which address."""
    parser.add_argument(
        "--base", default=None, help="base model: a Hugging Face directory or hub id (default: SmolLM2-135M-Instruct)"
    )
    add_quantize_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_storage_arguments(parser)
    parser.add_argument(
        "--hub",
        default=None,
        metavar="URL",
        help="serve adapters from this remote hub (loramux or huggingface.co) instead of the local registry",
    )
    parser.add_argument("--hub-token", default=None, help="token for --hub (default: $LORAMUX_TOKEN, then $HF_TOKEN)")


def _add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    """What the engine holds at once: adapter slots, the batch, the queue, the adapter cache and its readers."""
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="adapter slot memory on the device: this many adapters of --max-lora-rank at once, more of lower rank "
        "(paged by rank 8 where --max-lora-rank is a multiple of 8: eight rank-8 adapters take one rank-64 slot; "
        "default: on a GPU as many as a tenth of the memory the weights leave holds, at most 64; 4 on the CPU)",
    )
    parser.add_argument("--max-lora-rank", type=int, default=64, help="highest adapter rank served (default 64)")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="requests decoded in one batch (default: 256 on a GPU, 32 on the CPU)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens computed in one step, prompt chunks included (default: 8192 on a GPU, 512 on the CPU)",
    )
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


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """How the step loop runs and requests end: overlap, context and output lengths, device, shutdown, auth."""
    parser.add_argument(
        "--overlap-outputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send each step's outputs to the API while the next step computes (more tokens/s, each output one step "
        "later) or before it starts (default: overlap on a GPU, not on the CPU)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the base's)")
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        help="tokens a chat completion may generate when it gives no max_tokens (the base's generation_config.json "
        "max_new_tokens where smaller; 0: up to the context length; default 1024)",
    )
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


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse the options of `add_server_arguments` (and --api-servers) that no server could run with."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("slots", "max_queue", "adapter_cache_mb", "adapter_readers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("max_lora_rank", "max_num_seqs", "max_num_batched_tokens", "api_servers"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.default_max_tokens < 0:
        raise ValueError(f"--default-max-tokens must not be negative, got {args.default_max_tokens}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.shutdown_grace < 0:
        raise ValueError("--shutdown-grace must not be negative")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from loramux.registry.registry import collect_garbage_periodically

    registry = open_registry(args)  # API keys (and, without --hub, the adapters) live here
    collect_garbage_periodically(registry)  # uploads never committed, partial uploads, unused xorbs
    keys = registry.store.has_keys()
    if not keys and not is_loopback(args.host) and not args.allow_insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {args.host} with no API keys (single-user mode lets anyone use the server); "
            "create one with `loramux tenants create NAME` and `loramux keys create NAME`, "
            "or pass --allow-insecure-no-auth"
        )

    from loramux.server.api.state import ServerSettings

    engine = engine_config(args)
    hub_token = args.hub_token or os.environ.get("LORAMUX_TOKEN") or os.environ.get("HF_TOKEN")
    settings = ServerSettings(
        base=args.base,
        device=args.device,
        engine=engine,
        data_dir=args.data_dir,
        database_url=database_url(args),
        blob_url=blob_url(args),
        hub_url=args.hub,
        hub_token=hub_token,
        shutdown_grace=args.shutdown_grace,
        log_level=logging.getLogger().getEffectiveLevel(),
        default_max_tokens=args.default_max_tokens,
        quantize=args.quantize,
    )
    logging.getLogger("loramux.access").setLevel(logging.INFO)
    logging.getLogger("loramux.server.api.state").setLevel(logging.INFO)
    mode = "API keys required" if keys else "single-user mode (no API keys)"
    adapters = f"adapters from {args.hub}" if args.hub else "adapters from the local registry"
    print(f"loramux serve on http://{args.host}:{args.port} ({mode}; {adapters}); loading the model...", flush=True)
    api_servers = args.api_servers or _api_servers_for(args.device)
    if api_servers == 1:
        from loramux.server.api.app import serve
        from loramux.server.api.state import ServerState

        return serve(ServerState(settings, registry), args.host, args.port)
    print(f"{api_servers} API processes for one engine process", flush=True)
    return _supervise(settings, args.host, args.port, api_servers)


def engine_config(args: argparse.Namespace):
    """The EngineConfig that `add_server_arguments`' options describe."""
    from loramux.server.engine.config import EngineConfig

    return EngineConfig(
        num_slots=args.slots,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue=args.max_queue,
        adapter_cache_bytes=args.adapter_cache_mb * MiB,
        adapter_reader_processes=args.adapter_readers,
        overlap_outputs=args.overlap_outputs,
        max_model_len=args.max_model_len,
    )


def _api_servers_for(device: str | None) -> int:
    """The default --api-servers: GPU_API_SERVERS where the engine runs on a GPU and the host has the cores."""
    if (os.cpu_count() or 1) < GPU_API_SERVERS_MIN_CPUS or (device is not None and not device.startswith("cuda")):
        return 1
    import torch

    return GPU_API_SERVERS if torch.cuda.is_available() else 1


def _supervise(settings, host: str, port: int, count: int) -> int:
    """Start the engine, then `count` API processes on one listening socket; on SIGTERM/SIGINT let them drain, then
    stop the engine. Returns the exit status."""
    import multiprocessing
    import socket
    import tempfile

    from loramux.server.api.state import Attachment
    from loramux.server.engine.core import EngineProcess, EngineStartError

    # Every API process records its metrics in files here; a scrape of any one adds them all up.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir = tempfile.mkdtemp(prefix="loramux-metrics-")
    engine = EngineProcess.start(settings.core_spec())
    try:
        info = engine.wait_ready()
    except EngineStartError as exc:
        raise ValueError(f"could not load the base model: {exc}") from None
    for note in info.notes:
        print(f"engine: {note}", flush=True)
    listener = socket.create_server((host, port), backlog=2048)
    attachment = Attachment(engine.address, info, engine.dead)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_api_process, args=(settings, attachment, listener), name=f"loramux-api-{i}")
        for i in range(count)
    ]
    stopping: list[int] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        if signum == signal.SIGTERM:  # SIGINT from a terminal reaches every process of the group by itself
            for worker in workers:
                if worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        print(f"model {info.name} ready: {count} API processes", flush=True)
        while any(worker.is_alive() for worker in workers):
            for worker in workers:
                worker.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
        engine.stop()
        for path in os.scandir(metrics_dir):
            os.unlink(path.path)
        os.rmdir(metrics_dir)
    failed = [w.exitcode for w in workers if w.exitcode not in (0, None)]
    return 0 if stopping or not failed else 1


def _api_process(settings, attachment, listener) -> None:
    """One API process of several: serve on the shared socket, attached to the running engine."""
    from loramux.server.api.app import serve
    from loramux.server.api.state import ServerState

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("loramux.access").setLevel(logging.INFO)
    state = ServerState(settings, settings.open_registry(), attach=attachment)
    state.prepare()  # before it takes connections: a request here never meets a tokenizer still loading
    host, port = listener.getsockname()[:2]
    raise SystemExit(serve(state, host, port, sockets=[listener]))
