"""The `loramux` command. Each sub-command lives in the module that owns its work and is imported only when run,
so that commands which need no torch start fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("loramux.server.generate_cli", "load a base model (and adapter) and answer one prompt"),
    "serve": ("loramux.server.serve_cli", "serve the OpenAI-compatible API, the adapter hub and /metrics"),
    "hub": ("loramux.registry.cli.hub", "serve the adapter hub (Hugging Face Hub API) alone, without torch"),
    "tenants": ("loramux.registry.cli.tenants", "create and list tenants and their namespaces"),
    "keys": ("loramux.registry.cli.keys", "create, list and revoke API keys"),
    "train-worker": ("loramux.server.train_worker", "claim fine-tuning jobs from the registry and train them"),
}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux", description="Serve many LoRA fine-tunes of one NF4 base model from one GPU."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        _load(module).add_arguments(command)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_load(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CommandError, ValueError, OSError) as exc:
        print(f"loramux {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
