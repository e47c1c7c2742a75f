"""The offline merge path: fold `scaling·B·A` into the base weights and write a plain Hugging Face checkpoint.

The adapters were trained against (and are served with) the NF4 base, so each decoder linear weight is first
quantized to NF4 exactly as the server does (`NF4Linear`: blocksize 64, double quantization) and dequantized; the
deltas are added to `dequant(NF4(W))` in fp32 and the result is rounded once to bf16. The checkpoint's config.json
carries `MERGE_MARKER`, so that `loramux serve --base DIR` keeps it in bf16; every merge also measures how far
quantizing it to NF4 again would move the model (`measure_drift`), since that can erase what the adapter learned.
The base is streamed one tensor at a time from its safetensors files and, on a GPU, only the layer being merged is
on the device, so an 8B-shape model never has two copies in GPU memory. The checkpoint is written into a temporary
sibling directory and renamed at the end: a failure leaves nothing under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from loramux.adapters.merge_drift import LINEAR_WEIGHT, Drift, measure_drift
from loramux.core.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loramux.core.adapter_source import ResolvedAdapter
from loramux.core.model_config import ModelConfig
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.models.checkpoint import MERGE_MARKER, BaseModelError, load_config, resolve_base
from loramux.server.models.lora_weights import LoraModule, LoraWeights, load_lora

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained
OUT_DTYPE = torch.bfloat16
# Below this top-1 agreement between the unmerged model and the merge re-quantized to NF4, `adapters merge` warns
# that serving the merge in NF4 changes its answers.
NF4_AGREEMENT_WARNING = 0.99

# Everything of the base directory besides weights and config that a user of the merged model needs.
_SIDE_FILES = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|.*\.model"
    r"|chat_template\.(jinja|json)|generation_config\.json)"
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class MergeError(ValueError):
    """The merge cannot be done as asked; nothing was written under the output name."""


@dataclass(frozen=True)
class WeightedAdapter:
    """One adapter to fold in: its resolved revision, the factor on its delta and the revision the user asked for."""

    adapter: ResolvedAdapter
    weight: float = 1.0
    requested: str | None = None  # e.g. "main" or a tag; the commit is what was actually merged


@dataclass
class MergeResult:
    out: Path
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of every weight shard
    total_bytes: int = 0
    drift: Drift | None = None


def merge_adapters(
    base: str | None,
    adapters: Sequence[WeightedAdapter],
    out: Path,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> MergeResult:
    """Write `base` with `Σ weight·scaling·B·A` of `adapters` folded in as a bf16 checkpoint at `out`, and measure the
    drift that serving it in NF4 would add (`MergeResult.drift`, see `measure_drift`).

    base: a model directory, a hub id, or None for the default base. Raises `MergeError` (or an adapter's
    `AdapterConfigError`) before anything is written when the input is bad.
    """
    if not adapters:
        raise MergeError("no adapter to merge")
    if max_shard_bytes < 1:
        raise MergeError("the maximum shard size must be positive")
    base_dir = resolve_base(base)
    config = load_config(base_dir)
    out = Path(out).expanduser().absolute()
    _check_output(out, force, [base_dir, *(a.adapter.path for a in adapters)])
    # Every adapter is read and checked against the base before anything is written.
    loras = [load_lora(a.adapter.path, config) for a in adapters]
    device = torch.device(device) if device is not None else _default_device()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        result = MergeResult(out=out)
        result.files, result.total_bytes = _write_weights(
            base_dir, config, loras, [a.weight for a in adapters], tmp, max_shard_bytes, device, progress
        )
        base_name = base if base and not Path(base).expanduser().is_dir() else base_dir.name
        _write_side_files(base_dir, tmp, _merge_record(base_name, adapters))
        result.drift = measure_drift(base_dir, adapters, tmp, device)
        _write_readme(tmp, base_name, base_dir, adapters, result)
        _install(tmp, out)
        return result
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MergeError(f"no space left on the disk of {out.parent}; nothing was written to {out}") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_output(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    for path in inputs:
        path = Path(path).absolute()
        if out == path or out in path.parents:
            raise MergeError(f"the output directory {out} would replace an input ({path})")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise MergeError(f"{out} exists and is not a directory")
        if not force:
            raise MergeError(f"the output directory {out} exists; pass --force to replace it")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and removed only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "previous")
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / "previous", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---- weights ----------------------------------------------------------------------------------------------------


def _write_weights(
    base_dir: Path,
    config: ModelConfig,
    loras: Sequence[LoraWeights],
    factors: Sequence[float],
    target: Path,
    max_shard_bytes: int,
    device: torch.device,
    progress: bool,
) -> tuple[dict[str, str], int]:
    writer = _ShardWriter(target, max_shard_bytes)
    merged: set[str] = set()
    with tqdm(total=config.num_hidden_layers, desc="merging", unit="layer", disable=not progress) as bar:
        for layer, tensors in _base_tensors_by_layer(base_dir):
            for name, tensor in tensors:
                match = LINEAR_WEIGHT.fullmatch(name)
                if match is not None:
                    module = match.group(1)
                    deltas = [(lora.modules.get(module), f) for lora, f in zip(loras, factors, strict=True)]
                    tensor = fold(tensor, deltas, device)
                    merged.add(module)
                if tensor.is_floating_point():  # integer buffers, if a checkpoint has any, keep their dtype
                    tensor = tensor.to(OUT_DTYPE)
                writer.add(name, tensor.contiguous())
            if layer is not None:
                bar.update(1)
    missing = {m for lora in loras for m in lora.modules} - merged
    if missing:
        raise MergeError(f"the base checkpoint has no weight for {', '.join(sorted(missing))}")
    return writer.finish()


def fold(weight: torch.Tensor, deltas: Sequence[tuple[LoraModule | None, float]], device: torch.device) -> torch.Tensor:
    """`dequant(NF4(weight)) + Σ factor·scaling·B·A` in fp32, returned on the CPU. weight: (out, in).

    `deltas` holds (LoraModule or None, factor) per adapter; None where the adapter does not touch this layer.
    """
    # NF4Linear is the server's own quantizer, so the merged base is bit-for-bit the weight the server computes with
    # (fp32 compute, as on the CPU).
    w = NF4Linear(weight.to(device), None, torch.float32).dequantize()  # (out, in) fp32
    for module, factor in deltas:
        if module is None or factor == 0:
            continue
        b, a = module.b.to(device, torch.float32), module.a.to(device, torch.float32)  # (out, r), (r, in)
        w.addmm_(b, a, alpha=factor * module.scaling)
    return w.cpu()


def _base_tensors_by_layer(base_dir: Path) -> Iterator[tuple[int | None, list[tuple[str, torch.Tensor]]]]:
    """The checkpoint's tensors read lazily, grouped by decoder layer (None: embeddings, final norm, head)."""
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{base_dir} holds no .safetensors weights (pickle checkpoints are not read)")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    groups: dict[int | None, list[str]] = {}
    for name in where:
        match = _LAYER.match(name)
        groups.setdefault(int(match.group(1)) if match else None, []).append(name)
    order = [None, *sorted(k for k in groups if k is not None)]
    for key in order:
        names = sorted(groups.get(key, []))
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(where[name], []).append(name)
        tensors = []
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                tensors.extend((name, f.get_tensor(name)) for name in file_names)
        yield key, tensors


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes` (one tensor larger than that is a shard alone),
    named like transformers' (`model.safetensors`, or `model-00001-of-00003.safetensors` + an index)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self.shards):05d}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> tuple[dict[str, str], int]:
        """Write what is pending, give the shards their final names; returns ({file: sha256}, total tensor bytes)."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for (path, tensor_names), final in zip(self.shards, names, strict=True):
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return {name: sha256_of(self.directory / name) for name in names}, self.total_bytes


# ---- config, tokenizer, README ---------------------------------------------------------------------------------


def _merge_record(base_name: str, adapters: Sequence[WeightedAdapter]) -> dict:
    """What config.json records under `MERGE_MARKER`: the base and each adapter's revision and weight."""
    return {
        "base": base_name,
        "adapters": [{"repo": a.adapter.repo, "commit": a.adapter.commit, "weight": a.weight} for a in adapters],
        "weights": "dequant(NF4(W)) + sum(weight * scaling * B @ A), bf16",
    }


def _write_side_files(base_dir: Path, target: Path, record: dict) -> None:
    """config.json with dtype bf16, no quantization config and the merge `record`, and the tokenizer, chat template,
    generation config."""
    raw = json.loads((base_dir / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["dtype"] = raw["torch_dtype"] = "bfloat16"
    raw[MERGE_MARKER] = record
    (target / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and _SIDE_FILES.fullmatch(path.name):
            shutil.copyfile(path, target / path.name)  # follows the hub cache's symlinks


def _write_readme(
    target: Path, base_name: str, base_dir: Path, adapters: Sequence[WeightedAdapter], result: MergeResult
) -> None:
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- loramux",
        "- merged-lora",
        "---",
        "",
        f"# {base_name} + {', '.join(a.adapter.repo for a in adapters)} (merged)",
        "",
        "Written by `adapters merge`: the LoRA adapters below are folded into the base weights,",
        "`W' = dequant(NF4(W)) + Σ weight·scaling·B·A`, and the result is stored in bf16. The base weights are the",
        "dequantized NF4 ones (NF4 with double quantization, blocksize 64), the weights the adapters were trained",
        "against and are served with, not the original 16-bit ones. Other tensors are the base's, in bf16.",
        "`loramux serve --base DIR` serves it in bf16 (config.json records the merge under `loramux_merge`);",
        "`--quantize nf4` serves it in NF4, a quarter of the memory, with the drift below.",
        "",
        "## Base",
        "",
        f"- name: `{base_name}`",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *(f"| {p.name} | {sha256_of(p)} |" for p in sorted(base_dir.glob("*.safetensors"))),
        "",
        "## Adapters",
        "",
        "| repo | revision | commit | weight | adapter_model.safetensors sha256 | adapter_config.json sha256 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in adapters:
        r = a.adapter
        lines.append(
            f"| {r.repo} | {a.requested or '-'} | {r.commit} | {a.weight:g} | {sha256_of(r.path / WEIGHTS_FILE)} "
            f"| {sha256_of(r.path / CONFIG_FILE)} |"
        )
    lines += ["", "## Files", "", "| file | sha256 |", "| --- | --- |"]
    lines += [f"| {name} | {digest} |" for name, digest in result.files.items()]
    if result.drift is not None:
        d = result.drift
        lines += [
            "",
            "## Drift when served in NF4",
            "",
            "Quantizing these merged weights to NF4 again (`loramux serve --base DIR --quantize nf4`) moves the model",
            f"away from the unmerged NF4 base + adapters by a mean KL divergence of {d.kl_mean:.4g} nats per next",
            f"token, with top-1 agreement {d.top1_agreement:.1%} over {d.positions} positions of {d.texts} built-in",
            "texts. In bf16 (the default) the merge computes what the unmerged model does, up to bf16 rounding.",
        ]
    (target / "README.md").write_text("\n".join(lines) + "\n")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
