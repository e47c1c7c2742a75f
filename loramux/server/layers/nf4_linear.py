"""A linear layer whose weight is stored in NF4 with double quantization (bitsandbytes, QLoRA's format)."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from types import ModuleType

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # values per absmax block, as in QLoRA
# On a GPU, a call of this many rows or more dequantizes the weight with bitsandbytes' kernel and multiplies with
# cuBLAS straight from here (what bitsandbytes itself does at these sizes on Hopper, reached through several layers of
# Python that cost about 0.2 ms of host time a call: an eager step makes 224 of them on the 8B shape). Below it,
# bitsandbytes' `matmul_4bit` runs: its fused 4-bit kernels for small batches (decode steps, captured in graphs).
DIRECT_DEQUANT_MIN_ROWS = 65
# On a GPU, calls of up to this many rows would multiply with `nf4_kernels.nf4_matmul`, which reads the 4-bit weight
# as it is stored instead of writing a bf16 copy of it first. 0, the default: on an H200 that kernel was slower than
# bitsandbytes' paths at every row count measured (`loadtests/bench_nf4.py`), so it is off until it is faster. Read
# at each call: CUDA graphs keep the path they were captured with.
FUSED_MAX_ROWS = 0


@functools.cache
def _fused_kernels() -> ModuleType | None:
    """`nf4_kernels`, or None where Triton is missing."""
    try:
        from loramux.server.layers import nf4_kernels
    except ImportError:
        return None
    return nf4_kernels


def cpu_dequant_cache_enabled() -> bool:
    """`LORAMUX_CPU_DEQUANT_CACHE=0` turns the CPU cache of dequantized weights off (see NF4Linear)."""
    return os.environ.get("LORAMUX_CPU_DEQUANT_CACHE", "1") != "0"


class NF4Linear(nn.Module):
    """`y = x·Wᵀ + b` with `W` [out, in] packed to 4 bits; the absmax constants are themselves 8-bit quantized.

    `compute_dtype` is what activations and the dequantized weight are in: bf16 on a GPU, fp32 on the CPU.

    On the CPU, bitsandbytes dequantizes the whole weight on every call, which made a decode step of the 135M default
    model cost ~0.25 s; so on the CPU the layer keeps `dequant(NF4(W))` after its first use (the same values, so
    the same outputs) and multiplies with it. The NF4 weight stays the source of truth. On a GPU the weight is not
    cached: memory is what NF4 is for there. `LORAMUX_CPU_DEQUANT_CACHE=0` turns the cache off.

    On a GPU the layer keeps only its absmax constants dequantized, once, in fp32 (`serving_state`), and computes with
    them: bitsandbytes otherwise dequantizes them again on every call (two more kernels and their host time wherever
    it dequantizes the weight to multiply, as it does for prompt chunks). The values are the ones bitsandbytes
    computes each call, so the outputs are too; the cost is 4 bytes of GPU memory per 64 weights beside the 8-bit
    constants (0.42 GiB for the 8B shape). Calls of `DIRECT_DEQUANT_MIN_ROWS` rows or
    more (prompt chunks) dequantize with bitsandbytes' kernel and multiply here, without its Python layers. Calls of
    up to `FUSED_MAX_ROWS` rows (0, none, by default: it is slower so far) go through `nf4_kernels.nf4_matmul`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        packed, state = bnbf.quantize_4bit(
            weight.to(compute_dtype).contiguous(),
            blocksize=BLOCK_SIZE,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
        self.register_buffer("packed", packed, persistent=False)
        self.quant_state = state  # double-quantized: the stored format, what `dequantize` reads
        self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False) if bias is not None else None
        self._dense: torch.Tensor | None = None  # CPU only: dequant(NF4(W)), (out, in), built on first use
        self.serving_state: bnbf.QuantState | None = None  # GPU only: quant_state with its absmax dequantized
        self._refresh_serving_state()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type == "cpu" and cpu_dequant_cache_enabled():
            if self._dense is None:
                self._dense = self.dequantize()
            return F.linear(x, self._dense, self.bias)
        state = self.serving_state or self.quant_state
        if FUSED_MAX_ROWS and self.serving_state is not None and x.numel() <= FUSED_MAX_ROWS * self.in_features:
            kernels = _fused_kernels() if x.dtype == self.compute_dtype else None
            if kernels is not None and kernels.supported(self.in_features, x.dtype):
                return kernels.nf4_matmul(x, self.packed, state.absmax, state.code, self.out_features, self.bias)
        if self.serving_state is not None and x.numel() >= DIRECT_DEQUANT_MIN_ROWS * self.in_features:
            dequantize = _nf4_dequantize_kernel(x.dtype) if x.dtype == self.compute_dtype else None
            if dequantize is not None:
                weight = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
                stream = torch.cuda.current_stream(x.device).cuda_stream
                pointers = (self.packed.data_ptr(), state.absmax.data_ptr(), weight.data_ptr())
                dequantize(None, *pointers, state.blocksize, weight.numel(), stream)
                return F.linear(x, weight, self.bias)
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=state, bias=self.bias)

    def dequantize(self) -> torch.Tensor:
        """The weight the model actually computes with, `dequant(NF4(W))`, [out, in] in `compute_dtype`."""
        return bnbf.dequantize_4bit(self.packed, self.quant_state)

    def _apply(self, fn, recurse: bool = True):  # keep the quantization constants on the same device
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)
        self._dense = None
        self._refresh_serving_state()
        return self

    def _refresh_serving_state(self) -> None:
        state = self.quant_state
        if self.packed.device.type != "cuda" or not state.nested:
            self.serving_state = None
            return
        # as bitsandbytes' dequantize_4bit does it on each call: the 8-bit constants dequantized, plus their offset
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        self.serving_state = bnbf.QuantState(
            absmax=absmax.float(),
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, bias={self.bias is not None}"


@functools.cache
def _nf4_dequantize_kernel(dtype: torch.dtype) -> Callable[..., None] | None:
    """bitsandbytes' CUDA entry point that dequantizes NF4 blocks with fp32 absmax into `dtype`: (code, packed,
    absmax, out, blocksize, numel, stream), called through a prototype of our own. None where this bitsandbytes
    build has no such entry (then `matmul_4bit` runs)."""
    from bitsandbytes.cextension import lib

    suffix = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    raw = getattr(getattr(lib, "_lib", None), f"cdequantize_blockwise_{suffix}_nf4", None)
    if suffix is None or raw is None:
        return None
    address = ctypes.cast(raw, ctypes.c_void_p).value
    pointer = ctypes.c_void_p
    prototype = ctypes.CFUNCTYPE(None, pointer, pointer, pointer, pointer, ctypes.c_int32, ctypes.c_int32, pointer)
    return prototype(address)
