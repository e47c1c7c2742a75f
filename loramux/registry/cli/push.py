"""`adapters push DIR NS/NAME`: validate a PEFT adapter directory and upload it as a new revision."""

from __future__ import annotations

import argparse
from pathlib import Path

from loramux.registry.cli.common import add_hub_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="a PEFT adapter directory (adapter_config.json + safetensors)")
    parser.add_argument("repo", metavar="NS/NAME", help="the adapter's name on the hub")
    parser.add_argument("--private", action="store_true", help="readable by its tenant only (new repos)")
    parser.add_argument("--message", "-m", default=None, help="revision message (default: 'Upload adapter')")
    add_hub_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loramux.registry.client import hub_token, hub_url, push
    from loramux.registry.names import check_repo_id

    check_repo_id(args.repo)
    url = hub_url(args.hub)
    result = push(args.directory, args.repo, url, hub_token(args.token), args.private, args.message or "Upload adapter")
    config = result.summary.config
    print(
        f"pushed {result.repo_id}@{result.commit} to {url}: rank {result.summary.max_rank}, alpha {config.lora_alpha}, "
        f"targets {', '.join(result.summary.target_modules)}"
    )
    return 0
