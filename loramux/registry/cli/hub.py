"""`loramux hub`: serve the registry's Hub-compatible routes alone (no torch, no GPU)."""

from __future__ import annotations

import argparse
import ipaddress
import signal

from loramux.registry.cli.common import add_storage_arguments, open_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--allow-insecure-no-auth",
        action="store_true",
        help="listen on a non-loopback address even though no API keys exist (anyone could write)",
    )
    add_storage_arguments(parser)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from loramux.registry.hub import create_hub_app
    from loramux.registry.registry import collect_garbage_periodically

    registry = open_registry(args)
    collect_garbage_periodically(registry)  # uploads never committed, partial uploads, unused xorbs
    keys = registry.store.has_keys()
    if not keys and not is_loopback(args.host) and not args.allow_insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {args.host} with no API keys (single-user mode lets anyone write); create one "
            "with `loramux tenants create NAME` and `loramux keys create NAME`, or pass --allow-insecure-no-auth"
        )
    mode = "API keys required for writes" if keys else "single-user mode (no API keys)"
    print(f"loramux hub on http://{args.host}:{args.port} ({mode})", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down: after SIGTERM the hub ends with status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(create_hub_app(registry), host=args.host, port=args.port, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, previous)
        registry.close()
    return 0
