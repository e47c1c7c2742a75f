"""Reading a PEFT LoRA adapter's tensors and checking them against a base model."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from loramux.core.adapter_config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterConfigError,
    module_name_of,
)
from loramux.core.model_config import LINEAR_MODULES, ModelConfig
from loramux.core.validate import TensorInfo, read_safetensors_header

_TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_SAFETENSORS_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}

_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


class AdapterMismatchError(AdapterConfigError):
    """The adapter's tensors do not fit its own config or the base model."""


@dataclass
class LoraModule:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraWeights:
    config: AdapterConfig
    modules: dict[str, LoraModule]  # by module name, e.g. "model.layers.0.self_attn.q_proj"
    buffer: torch.Tensor | None = None  # set by `packed`: the one flat tensor every A and B is a view of

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())

    def packed(self, dtype: torch.dtype, pin_memory: bool = False, b_rank_major: bool = False) -> LoraWeights:
        """A copy with every A and B in `dtype`, as views of one contiguous CPU buffer (page-locked with
        `pin_memory`, so that copies from it to a GPU are asynchronous). With `b_rank_major` each B's part of the
        buffer holds Bᵀ, `(r, out)`, as the serving slots keep it (`b` is still `(out, r)`: a transposed view)."""
        tensors = [t for m in self.modules.values() for t in (m.a, m.b)]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=pin_memory)
        views, offset = [], 0
        for i, t in enumerate(tensors):
            view = _view(flat[offset : offset + t.numel()], t.shape, b_rank_major and i % 2 == 1)
            view.copy_(t)
            views.append(view)
            offset += t.numel()
        pairs = zip(self.modules.items(), views[0::2], views[1::2], strict=True)
        modules = {name: LoraModule(a, b, m.scaling) for (name, m), a, b in pairs}
        return LoraWeights(self.config, modules, flat)


def base_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder linear layer, by its projection name."""
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


@dataclass
class LoraPlan:
    """What reading an adapter needs, worked out from its config and safetensors header before any tensor is read
    (`plan_lora`): the modules in name order, each one's A and B in the file, and their scalings. Small and
    picklable: an adapter reader process sends it back with the bytes it needs (`adapter_reader`)."""

    config: AdapterConfig
    weights_path: Path
    modules: list[str]  # sorted
    order: list[TensorInfo]  # A, B of each module: the buffer's layout
    scalings: list[float]  # by module

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of the one buffer every A and B is read into, as `dtype`."""
        return sum(info.numel for info in self.order) * dtype.itemsize

    def weights_over(self, buffer: torch.Tensor, dtype: torch.dtype, b_rank_major: bool = False) -> LoraWeights:
        """The weights as views of `buffer` (uint8, `nbytes(dtype)` bytes) holding the tensors already (`fill_lora`
        filled it, in this process or another): no read, no check."""
        flat = buffer.view(dtype)
        views = _views(flat, self.order, b_rank_major)
        modules = {
            module: LoraModule(a=a, b=b, scaling=scaling)
            for module, a, b, scaling in zip(self.modules, views[0::2], views[1::2], self.scalings, strict=True)
        }
        return LoraWeights(config=self.config, modules=modules, buffer=flat)


def load_lora(
    directory: Path,
    base: ModelConfig | None = None,
    dtype: torch.dtype = torch.float32,
    allocate: Callable[[int], torch.Tensor] | None = None,
    b_rank_major: bool = False,
) -> LoraWeights:
    """Read `adapter_config.json` + `adapter_model.safetensors` (never pickle) as `dtype` tensors on the CPU.

    With `base`, every module must exist in it with matching shapes. Raises `AdapterConfigError` naming the problem.
    Every A and B is a view of one buffer (`buffer`), module after module in name order, A then B, with no gaps:
    the layout of `packed`. `allocate(nbytes)` gives that buffer as a uint8 tensor (e.g. a region of a pinned
    arena); by default it is a new tensor. With `b_rank_major` each B's part of the buffer holds Bᵀ, `(r, out)`, the
    layout of the serving slots (so that a slot write is a copy of whole blocks); `b` is then a transposed view.

    The header is checked first (`plan_lora`), then the tensor bytes are read (`fill_lora`) with `readinto`, which
    releases the GIL for the whole read, straight into the buffer when the file already holds `dtype` in this
    layout (with `b_rank_major`, each B is then turned in place, a projection's B of every layer at once), else into
    a scratch buffer converted with one copy per tensor (B transposed as it is copied). A step loop on another thread is
    therefore not held up (safetensors' `load_file` keeps the GIL while it copies: with four threads loading, a loop
    of 1,500 kernel launches took 28x as long on an H100 host).
    """
    plan = plan_lora(directory, base)
    nbytes = plan.nbytes(dtype)
    buffer = allocate(nbytes) if allocate is not None else torch.empty(nbytes, dtype=torch.uint8)
    return fill_lora(plan, buffer, dtype, b_rank_major)


def plan_lora(directory: Path, base: ModelConfig | None = None) -> LoraPlan:
    """Check an adapter's config and safetensors header (against `base`, when given) and lay out its buffer.
    Raises `AdapterConfigError` naming the problem; reads no tensor."""
    directory = Path(directory)
    config = AdapterConfig.from_file(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterConfigError(
                "adapter_model.bin is a pickle file and is never loaded; convert it to safetensors "
                "(PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterConfigError(f"{WEIGHTS_FILE} is missing")
    try:
        infos = read_safetensors_header(weights_path)
    except OSError as exc:
        raise AdapterConfigError(f"{WEIGHTS_FILE} is not readable: {exc}") from exc

    pairs: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for name, info in infos.items():
        parsed = module_name_of(name)
        if parsed is None:
            raise AdapterMismatchError(f"unexpected tensor {name!r}: only lora_A/lora_B weights are supported")
        if info.dtype not in _TORCH_DTYPES:
            raise AdapterMismatchError(f"tensor {name!r} is {info.dtype}; LoRA weights are floating point")
        pairs.setdefault(parsed[0], {})[parsed[1]] = (name, info)
    if not pairs:
        raise AdapterMismatchError(f"{WEIGHTS_FILE} holds no LoRA tensors")

    shapes = base_shapes(base) if base is not None else None
    order: list[TensorInfo] = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterMismatchError(f"{module} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"][1].shape, pair["B"][1].shape
        rank = config.rank_for(module)
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise AdapterMismatchError(f"{module}: lora_A {a} and lora_B {b} do not match rank {rank}")
        if not config.targets(module):
            raise AdapterMismatchError(f"{module} has LoRA weights but is not in target_modules")
        if shapes is not None:
            _check_fits_base(module, a, b, shapes, base)
        order += [pair["A"][1], pair["B"][1]]
    modules = sorted(pairs)
    return LoraPlan(config, weights_path, modules, order, [config.scaling_for(m) for m in modules])


def fill_lora(plan: LoraPlan, buffer: torch.Tensor, dtype: torch.dtype, b_rank_major: bool = False) -> LoraWeights:
    """Read the tensors of `plan` into `buffer` (uint8, at least `plan.nbytes(dtype)` bytes) and check them finite;
    the weights are views of it (`LoraPlan.weights_over`). Raises `AdapterConfigError` (unreadable, truncated, NaN or
    infinite values)."""
    buffer = buffer[: plan.nbytes(dtype)]
    flat = buffer.view(dtype)
    b_kinds = [m.rsplit(".", 1)[-1] for m in plan.modules] if b_rank_major else None
    try:
        with open(plan.weights_path, "rb") as f:
            _read_tensors(f, plan.order, flat, b_kinds)
    except OSError as exc:
        raise AdapterConfigError(f"{WEIGHTS_FILE} is not readable: {exc}") from exc
    weights = plan.weights_over(buffer, dtype, b_rank_major)
    if not _all_finite(flat):  # one pass over the buffer; the module is named only on failure
        bad = next(name for name, m in weights.modules.items() if not (_all_finite(m.a) and _all_finite(m.b)))
        raise AdapterMismatchError(f"{bad} has NaN or infinite values")
    return weights


def _all_finite(t: torch.Tensor) -> bool:
    """Whether no value of `t` is NaN or infinite, in one reduction: the minimum and maximum are NaN if any value is,
    and -inf or inf if any value is. `torch.isfinite(t).all()` first writes a flag per value: on a 2-core CPU it took
    154 ms for the 27 million values of a rank-64 q/v adapter of the 8B shape, against 2.4 ms, and that pass would
    run on every core beside the step loop for each adapter read while serving."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _read_tensors(f: BinaryIO, order: list[TensorInfo], flat: torch.Tensor, b_kinds: list[str] | None) -> None:
    """Fill `flat` with the tensors of `order` (A, B, A, B, ...), back to back, converted to its dtype; with
    `b_kinds` (each module's projection name) every B transposed."""
    b_rank_major = b_kinds is not None
    target = _SAFETENSORS_DTYPES.get(flat.dtype)
    contiguous = all(x.end == y.start for x, y in itertools.pairwise(order))
    if contiguous and all(info.dtype == target for info in order):
        _read_into(f, order[0].start, flat.view(torch.uint8))  # the file holds the buffer as it is: one read
        if b_kinds is not None:
            _transpose_b_in_place(flat, order, b_kinds)
        return
    start, end = min(info.start for info in order), max(info.end for info in order)
    scratch = torch.empty(end - start, dtype=torch.uint8)
    _read_into(f, start, scratch)
    offset = 0
    for i, info in enumerate(order):
        source_dtype = _TORCH_DTYPES[info.dtype]
        raw = scratch[info.start - start : info.end - start]
        if (info.start - start) % source_dtype.itemsize:
            raw = raw.clone()  # an unaligned tensor (a hand-made file): its own storage
        dest = _view(flat[offset : offset + info.numel], info.shape, b_rank_major and i % 2 == 1)
        dest.copy_(raw.view(source_dtype).view(info.shape))
        offset += info.numel


def _transpose_b_in_place(flat: torch.Tensor, order: list[TensorInfo], kinds: list[str]) -> None:
    """Turn every B of `flat` (laid out as `order`: A, B, A, B, ...; `kinds`: each module's projection) into its
    transpose, in place (`b_runs`, `transpose_b_runs`)."""
    offsets = list(itertools.accumulate((info.numel for info in order), initial=0))
    shapes = [(info.shape[0], info.shape[1]) for info in order[1::2]]
    transpose_b_runs(flat, b_runs(zip(kinds, shapes, offsets[1::2], strict=True)))


BRun = tuple[tuple[int, int], int, int, int]  # (B's shape (out, r), first offset, stride between layers, count)


def b_runs(bs: Iterable[tuple[str, tuple[int, int], int]]) -> list[BRun]:
    """The runs that turn every B of a buffer, from each B's (projection, (out, r), offset), in buffer order.

    The B of one projection has one shape in every layer and, where the layers hold the same modules, lies at one
    stride from the last: each such run is turned with one copy out and one copy back, a few torch calls for the
    whole adapter instead of a few per module (the thread doing it then seldom takes the GIL from the step loop)."""
    runs: list[BRun] = []
    open_runs: dict[tuple[str, tuple[int, int]], list[int]] = {}  # (kind, shape) -> [first, stride, count]
    for kind, shape, offset in bs:
        run = open_runs.get((kind, shape))
        if run is not None and run[2] == 1:
            run[1:] = [offset - run[0], 2]
        elif run is not None and offset == run[0] + run[1] * run[2]:
            run[2] += 1
        else:
            if run is not None:
                runs.append((shape, run[0], run[1], run[2]))
            open_runs[(kind, shape)] = [offset, 0, 1]
    runs += [(shape, run[0], run[1], run[2]) for (_, shape), run in open_runs.items()]
    return runs


def transpose_b_runs(flat: torch.Tensor, runs: list[BRun]) -> None:
    """Turn the Bs of `runs` (offsets from `flat`'s first element) from (out, r) row-major to Bᵀ, in place, on
    `flat`'s device."""
    base = flat.storage_offset()
    for (out, rank), first, stride, count in runs:
        rows = flat.as_strided((count, out, rank), (stride, rank, 1), base + first)
        flat.as_strided((count, out, rank), (stride, 1, out), base + first).copy_(rows.clone())


def _view(region: torch.Tensor, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """A 1-D `region` as a `shape` (out, r) tensor: row-major, or (`transposed`) holding its transpose (r, out)."""
    return region.view(shape[1], shape[0]).t() if transposed else region.view(shape)


def _read_into(f: BinaryIO, position: int, target: torch.Tensor) -> None:
    f.seek(position)
    view = memoryview(target.numpy()).cast("B")
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise AdapterMismatchError(f"{WEIGHTS_FILE} is truncated")
        done += got


def _views(flat: torch.Tensor, order: list[TensorInfo], b_rank_major: bool) -> list[torch.Tensor]:
    pieces = flat.split([info.numel for info in order])  # one call for all: fewer GIL hand-overs than a slice each
    return [
        _view(p, info.shape, b_rank_major and i % 2 == 1) for i, (p, info) in enumerate(zip(pieces, order, strict=True))
    ]


def _check_fits_base(
    module: str, a: tuple[int, ...], b: tuple[int, ...], shapes: dict[str, tuple[int, int]], base: ModelConfig
) -> None:
    match = _MODULE.fullmatch(module)
    if match is None or match.group(3) not in LINEAR_MODULES:
        raise AdapterMismatchError(f"{module} is not a decoder linear layer of the base")
    if int(match.group(1)) >= base.num_hidden_layers:
        raise AdapterMismatchError(f"{module}: the base has only {base.num_hidden_layers} layers")
    out_features, in_features = shapes[match.group(3)]
    if a[1] != in_features or b[0] != out_features:
        raise AdapterMismatchError(
            f"{module}: adapter maps {a[1]} -> {b[0]} features, the base layer {in_features} -> "
            f"{out_features}; was it trained on another base?"
        )
