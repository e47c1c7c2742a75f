"""The `adapters` command: push, pull, list, describe, delete, merge and train adapters.

Each sub-command lives in the module that owns its work, listed in COMMANDS and imported when the parser is built:
keep torch imports inside `run()`, so that `adapters ls` answers in well under a second.
"""

from __future__ import annotations

import argparse
import sys

from loramux import cli

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: cli.Commands = {
    "push": ("loramux.registry.cli.push", "validate an adapter directory and upload it as a new revision"),
    "pull": ("loramux.registry.cli.pull", "download an adapter (newest revision or --revision)"),
    "ls": ("loramux.registry.cli.ls", "list the adapters and models you may read"),
    "show": ("loramux.registry.cli.show", "revisions, rank, alpha, targets, base model, size and files of an adapter"),
    "rm": ("loramux.registry.cli.rm", "delete an adapter repo with all its revisions"),
    "train": ("loramux.adapters.train_cli", "train a QLoRA adapter on chat JSONL and push it as a new revision"),
    "merge": ("loramux.adapters.merge_cli", "fold adapters into the base and write a bf16 Hugging Face checkpoint"),
}


DESCRIPTION = "Manage LoRA adapters on a loramux or Hugging Face hub."


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("adapters", DESCRIPTION, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return cli.run_commands(argv, "adapters", DESCRIPTION, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
