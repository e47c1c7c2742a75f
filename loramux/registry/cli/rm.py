"""`adapters rm NS/NAME`: delete a repo with all its revisions."""

from __future__ import annotations

import argparse

from loramux.registry.cli.common import add_hub_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", metavar="NS/NAME", help="the repo to delete (every revision)")
    add_hub_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loramux.registry.client import call, hub_api, hub_token, hub_url
    from loramux.registry.names import check_repo_id

    check_repo_id(args.repo)
    url = hub_url(args.hub)
    api = hub_api(url, hub_token(args.token))
    call("deleting", url, api.delete_repo, args.repo)
    print(f"deleted {args.repo}")
    return 0
