"""`adapters show NS/NAME`: revisions, rank, alpha, target modules, base model, size and each file's sha256."""

from __future__ import annotations

import argparse
import json

from loramux.registry.cli.common import add_hub_arguments, human_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", metavar="NS/NAME", help="the adapter to describe")
    parser.add_argument(
        "--revision",
        default=None,
        help="a commit id, or 7 or more of its first hex digits as `adapters ls` prints them (default: the newest "
        "revision)",
    )
    add_hub_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from loramux.registry.client import call, hub_api, hub_token, hub_url
    from loramux.registry.names import check_repo_id

    check_repo_id(args.repo)
    url, token = hub_url(args.hub), hub_token(args.token)
    api = hub_api(url, token)
    info = call("reading the repo", url, api.model_info, args.repo, revision=args.revision, files_metadata=True)
    commits = call("listing revisions", url, api.list_repo_commits, args.repo, revision=info.sha)
    print(f"{info.id} ({'private' if info.private else 'public'})")
    print(f"revision: {info.sha}")
    print(f"use it as: {info.id}@{info.sha[:12]} (requests, adapters merge) or --revision {info.sha[:12]}")
    names = {s.rfilename for s in info.siblings or []}
    if "adapter_config.json" in names:
        path = call("downloading", url, api.hf_hub_download, args.repo, "adapter_config.json", revision=info.sha)
        with open(path) as f:
            config = json.load(f)
        targets = config.get("target_modules")
        per_module = f" (per module: {config['rank_pattern']})" if config.get("rank_pattern") else ""
        print(f"rank: {config.get('r')}{per_module}")
        print(f"alpha: {config.get('lora_alpha')}" + (" (rsLoRA)" if config.get("use_rslora") else ""))
        print(f"target modules: {', '.join(sorted(targets)) if isinstance(targets, list) else targets}")
        print(f"base model: {config.get('base_model_name_or_path') or '-'}")
    total = sum(s.size or 0 for s in info.siblings or [])
    print(f"size: {human_size(total)} ({total} bytes)")
    print("files:")
    for s in info.siblings or []:
        # loramux's blob ids and LFS oids are sha256; huggingface.co names small files by their git blob id.
        sha = s.lfs.sha256 if s.lfs else s.blob_id if s.blob_id and len(s.blob_id) == 64 else None
        print(f"  {s.rfilename}\t{s.size}\t" + (f"sha256 {sha}" if sha else f"git blob {s.blob_id}"))
    print("revisions:")
    for c in commits:
        print(f"  {c.commit_id}\t{c.created_at:%Y-%m-%d %H:%M:%S}\t{c.title}")
    return 0
