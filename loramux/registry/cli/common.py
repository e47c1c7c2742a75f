"""Options shared by the registry's commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", default=None, help="hub URL (default: $LORAMUX_HUB, else http://127.0.0.1:8000)")
    parser.add_argument("--token", default=None, help="API token (default: $LORAMUX_TOKEN, then $HF_TOKEN)")


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="registry data directory (default: $LORAMUX_HOME/data)"
    )


def open_registry(args: argparse.Namespace):
    from loramux.registry.registry import Registry

    return Registry.open(args.data_dir)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
