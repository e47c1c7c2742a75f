"""The `adapters` command: push, pull, list, describe and delete adapters on a hub (and, later, merge and train).

Each sub-command lives in the module that owns its work, listed in COMMANDS and imported when the parser is built:
keep torch imports inside `run()`, so that `adapters ls` answers in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "push": ("loramux.registry.cli.push", "validate an adapter directory and upload it as a new revision"),
    "pull": ("loramux.registry.cli.pull", "download an adapter (newest revision or --revision)"),
    "ls": ("loramux.registry.cli.ls", "list the adapters and models you may read"),
    "show": ("loramux.registry.cli.show", "revisions, rank, alpha, targets, base model, size and files of an adapter"),
    "rm": ("loramux.registry.cli.rm", "delete an adapter repo with all its revisions"),
    "train": ("loramux.adapters.train_cli", "train a QLoRA adapter on chat JSONL and push it as a new revision"),
    "merge": ("loramux.adapters.merge_cli", "fold adapters into the base and write a bf16 Hugging Face checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapters", description="Manage LoRA adapters on a loramux or Hugging Face hub."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"adapters {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
