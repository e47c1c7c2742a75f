"""`adapters pull NS/NAME [--revision R] [--to DIR]`: download a revision's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from loramux.registry.cli.common import add_hub_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", metavar="NS/NAME", help="the adapter to download")
    parser.add_argument(
        "--revision",
        default=None,
        help="a commit id, or 7 or more of its first hex digits as `adapters ls` prints them (default: the newest "
        "revision)",
    )
    parser.add_argument("--to", type=Path, default=None, help="target directory (default: ./NAME)")
    add_hub_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loramux.registry.client import hub_token, hub_url, pull
    from loramux.registry.names import check_repo_id

    check_repo_id(args.repo)
    print(pull(args.repo, hub_url(args.hub), hub_token(args.token), args.revision, args.to))
    return 0
