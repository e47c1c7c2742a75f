"""The `loramux` command. Each sub-command lives in the module that owns its work and is imported only when run,
so that commands which need no torch start fast. `run_commands` is shared with the `adapters` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loramux import BNB_CPU_LOGGER, KERNELS_LOGGER

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
Commands = dict[str, tuple[str, str]]

COMMANDS: Commands = {
    "generate": ("loramux.server.generate_cli", "load a base model (and an adapter) and answer one prompt"),
    "serve": ("loramux.server.serve_cli", "serve the OpenAI-compatible API, the adapter hub and /metrics"),
    "cluster": ("loramux.cluster.cli", "serve replicas on Ray Serve, routed by adapter (the ray extra)"),
    "hub": ("loramux.registry.cli.hub", "serve the adapter hub (Hugging Face Hub API) alone, without torch"),
    "tenants": ("loramux.registry.cli.tenants", "create and list tenants and their namespaces"),
    "keys": ("loramux.registry.cli.keys", "create, list and revoke API keys"),
    "db": ("loramux.registry.cli.db", "create or migrate the tables of a PostgreSQL registry database"),
    "train-worker": ("loramux.adapters.train_worker", "claim fine-tuning jobs from the registry and train them"),
}
DESCRIPTION = "Serve many LoRA fine-tunes of one NF4 base model from one GPU."


def build_parser(prog: str = "loramux", description: str = DESCRIPTION, commands: Commands = COMMANDS):
    """The parser of a command whose sub-commands are the modules in `commands`. The modules are imported here, so
    they keep heavy imports (torch) inside `run()`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in commands.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(command)
    return parser


def run_commands(
    argv: list[str] | None, prog: str = "loramux", description: str = DESCRIPTION, commands: Commands = COMMANDS
) -> int:
    """Parse `argv` and run the chosen sub-command. A ValueError or OSError is a user-facing failure: one line
    `PROG COMMAND: error: ...` on stderr and exit status 1."""
    args = build_parser(prog, description, commands).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        for quieted in (BNB_CPU_LOGGER, KERNELS_LOGGER):  # quieted in loramux/__init__.py, shown here
            logging.getLogger(quieted).setLevel(logging.NOTSET)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run_commands(argv)


if __name__ == "__main__":
    sys.exit(main())
