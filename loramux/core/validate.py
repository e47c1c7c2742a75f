"""Checking an adapter before it is stored, without torch: the config, the safetensors header (read here: 8-byte
little-endian length + JSON), shapes against ranks, finite values (numpy over a memory map), and size limits.

The registry runs these checks on every commit (the check that protects stored data) and the `adapters push`
command runs them first so that a bad adapter fails before any upload.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loramux.core.adapter_config import (
    CONFIG_FILE,
    MAX_RANK,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterConfigError,
    module_name_of,
)
from loramux.core.model_config import LINEAR_MODULES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# dtype -> bytes per element; LoRA weights are floating point.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
ALL_DTYPES = {**FLOAT_DTYPES, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
              "I64": 8, "U64": 8, "BOOL": 1}  # fmt: skip
_MODULE = re.compile(r"(?:.+\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


class AdapterValidationError(AdapterConfigError):
    """The adapter (or a file of a model repo) is refused; the message names the problem."""


@dataclass(frozen=True)
class Limits:
    max_rank: int = MAX_RANK
    max_files: int = 64
    max_file_bytes: int = 4 << 30  # an adapter's weights: rank 256 on a 70B model stays well under this
    max_model_file_bytes: int = 64 << 30  # one shard of a merged model
    max_header_bytes: int = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class AdapterSummary:
    config: AdapterConfig
    ranks: dict[str, int]  # module name -> rank
    dtypes: set[str] = field(default_factory=set)
    weights_bytes: int = 0

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def target_modules(self) -> list[str]:
        """The projection names the adapter holds weights for, e.g. ['q_proj', 'v_proj']."""
        return sorted({module.rsplit(".", 1)[-1] for module in self.ranks})


def read_safetensors_header(path: Path, max_header_bytes: int = Limits.max_header_bytes) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, checked against the file's real size (truncation, overlaps,
    headers that claim more bytes than exist)."""
    name = Path(path).name
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterValidationError(f"{name} is truncated: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > max_header_bytes or header_len > size - 8:
            raise AdapterValidationError(
                f"{name}: its header claims {header_len} bytes but the file has {size - 8}: "
                "truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterValidationError(f"{name} is not a safetensors file: its header is not JSON") from exc
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{name} is not a safetensors file: its header is not a JSON object")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) and dtype in ALL_DTYPES
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterValidationError(f"{name}: tensor {tensor!r} has a malformed header entry")
        if end > data_len or begin > end:
            raise AdapterValidationError(f"{name} is truncated: tensor {tensor!r} lies past the end of the file")
        if end - begin != math.prod(shape) * ALL_DTYPES[dtype]:
            raise AdapterValidationError(f"{name}: tensor {tensor!r} has {end - begin} bytes for shape {list(shape)}")
        tensors[tensor] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    spans = sorted((t.start, t.end) for t in tensors.values())
    if any(a_end > b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans)):
        raise AdapterValidationError(f"{name}: tensors overlap in the file")
    if sum(end - start for start, end in spans) != data_len:
        raise AdapterValidationError(f"{name}: the file's size does not match its tensors (truncated or padded)")
    return tensors


def refuse_pickle(paths: list[str]) -> None:
    for path in paths:
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterValidationError(
                f"{path} is a pickle file, which loramux never stores or loads (it can run code). Convert it to "
                "safetensors: load the adapter with peft and save it with "
                "model.save_pretrained(DIR, safe_serialization=True), then push DIR"
            )


def validate_adapter_files(files: Mapping[str, Path], limits: Limits = Limits()) -> AdapterSummary:
    """Validate a PEFT LoRA adapter given as {path in repo: local file}; returns what it holds."""
    refuse_pickle(list(files))
    if len(files) > limits.max_files:
        raise AdapterValidationError(f"too many files: {len(files)} (the limit is {limits.max_files})")
    for path, local in files.items():
        size = Path(local).stat().st_size
        if size > limits.max_file_bytes:
            raise AdapterValidationError(f"{path} has {size} bytes, over the limit of {limits.max_file_bytes}")
    if CONFIG_FILE not in files:
        raise AdapterValidationError(f"{CONFIG_FILE} is missing: not a PEFT adapter")
    if WEIGHTS_FILE not in files:
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing")
    config = AdapterConfig.from_file(files[CONFIG_FILE])
    weights = Path(files[WEIGHTS_FILE])
    tensors = read_safetensors_header(weights, limits.max_header_bytes)
    summary = AdapterSummary(config=config, ranks={})

    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        parsed = module_name_of(name)
        if parsed is None:
            raise AdapterValidationError(f"unexpected tensor {name!r}: only lora_A/lora_B weights are supported")
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterValidationError(f"tensor {name!r} has dtype {info.dtype}; LoRA weights must be F16/BF16/F32")
        pairs.setdefault(parsed[0], {})[parsed[1]] = info
    if not pairs:
        raise AdapterValidationError(f"{WEIGHTS_FILE} holds no LoRA tensors")

    dims: dict[str, tuple[int, int]] = {}  # projection -> (in, out), the same in every layer
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterValidationError(f"{module} has lora_{next(iter(pair))} without its partner")
        match = _MODULE.fullmatch(module)
        if match is None or match.group(3) not in LINEAR_MODULES:
            raise AdapterValidationError(
                f"{module} is not a decoder linear layer loramux serves ({', '.join(LINEAR_MODULES)})"
            )
        if not config.targets(module):
            raise AdapterValidationError(f"{module} has LoRA weights but is not in target_modules")
        a, b = pair["A"], pair["B"]  # A: (r, in), B: (out, r)
        rank = config.rank_for(module)
        if rank > limits.max_rank:
            raise AdapterValidationError(f"{module} has rank {rank}, over the limit of {limits.max_rank}")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterValidationError(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not match rank {rank} "
                "(expected A (r, in) and B (out, r))"
            )
        projection = match.group(3)
        if dims.setdefault(projection, (a.shape[1], b.shape[0])) != (a.shape[1], b.shape[0]):
            raise AdapterValidationError(f"{module}: its shape differs from other layers' {projection}")
        for side, info in pair.items():
            if not _all_finite(weights, info):
                raise AdapterValidationError(f"{module}: lora_{side} has NaN or infinite values")
            summary.dtypes.add(info.dtype)
        summary.ranks[module] = rank
    summary.weights_bytes = weights.stat().st_size
    return summary


def validate_model_files(files: Mapping[str, Path], limits: Limits = Limits()) -> None:
    """A model repo (e.g. a merged model): no pickle, sane sizes, and every safetensors file well-formed."""
    refuse_pickle(list(files))
    if len(files) > limits.max_files * 16:
        raise AdapterValidationError(f"too many files: {len(files)}")
    for path, local in files.items():
        size = Path(local).stat().st_size
        if size > limits.max_model_file_bytes:
            raise AdapterValidationError(f"{path} has {size} bytes, over the limit of {limits.max_model_file_bytes}")
        if path.endswith(".safetensors"):
            read_safetensors_header(Path(local), limits.max_header_bytes)


def adapter_files_in(directory: Path) -> dict[str, Path]:
    """The files `adapters push DIR` uploads: every regular file under DIR except hidden ones (e.g. `.cache`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterValidationError(f"{directory} is not a directory")
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        files[rel.as_posix()] = path
    return files


def validate_adapter_dir(directory: Path, limits: Limits = Limits()) -> AdapterSummary:
    return validate_adapter_files(adapter_files_in(directory), limits)


def _all_finite(path: Path, info: TensorInfo) -> bool:
    if info.numel == 0:
        return True
    count = info.numel
    if info.dtype == "BF16":
        # numpy has no bfloat16: a bf16 value is NaN/inf exactly when all 8 exponent bits are set.
        bits = np.memmap(path, dtype="<u2", mode="r", offset=info.start, shape=(count,))
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[info.dtype]
    values = np.memmap(path, dtype=dtype, mode="r", offset=info.start, shape=(count,))
    return bool(np.isfinite(values).all())


def check_fits_base(files: Mapping[str, Path], shapes: Mapping[str, tuple[int, int]], num_layers: int) -> None:
    """Refuse an (already validated) adapter that a server could not load on its base: a layer the base lacks, or
    features that differ from the base layer's (`shapes`: projection -> (out, in))."""
    tensors = read_safetensors_header(Path(files[WEIGHTS_FILE]))
    for name, info in sorted(tensors.items()):
        parsed = module_name_of(name)
        match = _MODULE.fullmatch(parsed[0]) if parsed else None
        if parsed is None or match is None:
            continue  # validate_adapter_files has refused these already
        module, side = parsed
        if int(match.group(1)) >= num_layers:
            raise AdapterValidationError(f"{module}: the base model has only {num_layers} layers")
        out_features, in_features = shapes[match.group(3)]
        # A: (r, in) must read the base layer's input, B: (out, r) must write its output.
        features, expected = (info.shape[1], in_features) if side == "A" else (info.shape[0], out_features)
        if features != expected:
            raise AdapterValidationError(
                f"{module}: lora_{side} {list(info.shape)} does not fit the base layer ({in_features} -> "
                f"{out_features} features); was the adapter trained on another base model?"
            )
