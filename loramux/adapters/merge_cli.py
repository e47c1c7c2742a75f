"""`adapters merge`: fold one or more LoRA adapters into the base and write a bf16 Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from loramux.registry.cli.common import add_hub_arguments
from loramux.registry.client import hub_token, hub_url

EPILOG = (
    "The adapters are folded into the dequantized NF4 base weights, dequant(NF4(W)), the weights they were trained "
    "against and are served with, not the original 16-bit ones. The checkpoint is written into a temporary sibling "
    "directory and renamed when complete, so a failure leaves nothing under --out. `loramux serve --base OUT` serves "
    "it in bf16; every merge reports how far quantizing it to NF4 again (`--quantize nf4`) would move the model "
    "(mean KL divergence, top-1 agreement against the unmerged NF4 base + adapters) and warns when top-1 agreement "
    "is below 99%."
)

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_UNITS["tib"] = 2**40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER",
        help="NS/NAME[@REVISION] on the hub, or a local PEFT adapter directory; several are merged as a weighted sum",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write the merged checkpoint into")
    parser.add_argument(
        "--base",
        default=None,
        help="base model the adapters were trained on: a Hugging Face directory or hub id (default: "
        "SmolLM2-135M-Instruct); its decoder linear weights are used as dequantized NF4",
    )
    parser.add_argument(
        "--weights", default=None, help="comma-separated factor per adapter delta, e.g. 0.7,0.3 (default: 1 each)"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)"
    )
    parser.add_argument("--push", metavar="NS/NAME", default=None, help="upload the merged checkpoint as a model repo")
    add_hub_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from loramux.adapters.merge import NF4_AGREEMENT_WARNING, merge_adapters

    factors = parse_weights(args.weights, len(args.adapters))
    max_shard_bytes = parse_size(args.max_shard_size)
    hub, token = hub_url(args.hub), hub_token(args.token)
    if args.push is not None:
        _check_repo_name(args.push)
    inputs = [_resolve(text, factor, hub, token) for text, factor in zip(args.adapters, factors, strict=True)]
    result = merge_adapters(
        args.base,
        inputs,
        args.out,
        force=args.force,
        max_shard_bytes=max_shard_bytes,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"wrote {result.out} ({len(result.files)} weight file(s), {result.total_bytes / 1e9:.2f} GB in bf16)")
    print(f"serve it with: loramux serve --base {result.out} (bf16)")
    d = result.drift
    print(
        f"served in NF4 instead (--quantize nf4): mean KL {d.kl_mean:.4g} nats, top-1 agreement "
        f"{d.top1_agreement:.1%} ({d.positions} positions, {d.texts} texts) against the unmerged NF4 base + adapters"
    )
    if d.top1_agreement < NF4_AGREEMENT_WARNING:
        print(
            f"warning: in NF4 the merge picks another next token at {1 - d.top1_agreement:.1%} of positions; it "
            "would not answer like its adapter: serve it in bf16 (the default), or serve the adapter on the NF4 base",
            file=sys.stderr,
        )
    if args.push is not None:
        print(f"pushed to {push_merged(result.out, args.push, hub, token)}")
    return 0


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        factors = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--weights {text!r} must be comma-separated numbers") from exc
    if len(factors) != count:
        raise ValueError(f"--weights has {len(factors)} value(s) for {count} adapter(s)")
    if not all(math.isfinite(f) for f in factors):
        raise ValueError("--weights must be finite numbers")
    return factors


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size < 1:
        raise ValueError("--max-shard-size must be positive")
    return size


def _resolve(text: str, factor: float, hub: str, token: str | None):
    """A local adapter directory as it is, or NS/NAME[@REV] pulled through the hub."""
    from loramux.adapters.merge import WeightedAdapter
    from loramux.core.adapter_source import AdapterRef
    from loramux.registry.source import resolve_adapter_argument

    resolved = resolve_adapter_argument(text, hub, token)
    requested = None if resolved.commit == "local" else (AdapterRef.parse(text).revision or "main")
    return WeightedAdapter(resolved, factor, requested=requested)


def _check_repo_name(name: str) -> None:
    from loramux.core.adapter_source import AdapterRef

    try:
        ref = AdapterRef.parse(name)
    except ValueError as exc:
        raise ValueError(f"--push {name!r} is not a repo name (ns/name)") from exc
    if ref.revision is not None:
        raise ValueError(f"--push {name!r} names a revision; give ns/name")


def push_merged(directory: Path, repo: str, hub: str, token: str | None) -> str:
    """Upload `directory` as the model repo `repo` (created if needed); returns the new commit id."""
    from loramux.registry.client import call, hub_api, new_repo_removed_on_failure

    api = hub_api(hub, token)
    with new_repo_removed_on_failure(api, hub, repo, repo_type="model"):
        commit = call(
            "uploading", hub, api.upload_folder, folder_path=str(directory), repo_id=repo, repo_type="model",
            commit_message="adapters merge",
        )  # fmt: skip
    return f"{hub}/{repo} (commit {commit.oid})"
