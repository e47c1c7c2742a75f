"""Options shared by the registry's commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", default=None, help="hub URL (default: $LORAMUX_HUB, else http://127.0.0.1:8000)")
    parser.add_argument("--token", default=None, help="API token (default: $LORAMUX_TOKEN, then $HF_TOKEN)")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the registry lives: by default SQLite and blob files in the data directory; with --database-url and
    --blob-url, a PostgreSQL database and an S3 bucket that several processes and machines share."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="registry data directory: SQLite, blobs, or with --blob-url the local cache of the bucket "
        "(default: $LORAMUX_HOME/data)",
    )
    add_database_url_argument(parser)
    parser.add_argument(
        "--blob-url",
        default=None,
        metavar="s3://BUCKET/PREFIX",
        help="keep blobs in this S3 (or S3-compatible) bucket instead of the data directory; endpoint and credentials "
        "from AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... (default: $LORAMUX_BLOB_URL)",
    )


def add_database_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=None,
        metavar="postgresql://...",
        help="keep the registry's metadata in this PostgreSQL database instead of SQLite in the data directory "
        "(default: $LORAMUX_DATABASE_URL)",
    )


def database_url(args: argparse.Namespace) -> str | None:
    return args.database_url or os.environ.get("LORAMUX_DATABASE_URL") or None


def blob_url(args: argparse.Namespace) -> str | None:
    return args.blob_url or os.environ.get("LORAMUX_BLOB_URL") or None


def open_registry(args: argparse.Namespace):
    """The registry that `add_storage_arguments`' options (or their variables) name."""
    from loramux.registry.registry import Registry

    return Registry.open(args.data_dir, database_url(args), blob_url(args))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
