"""Triton kernels for batched multi-adapter LoRA on the GPU: shrink (`h = x·Aᵀ`) and expand (`y += s·h·Bᵀ`).

Each target module holds adapter slots, `A: (S, r_max, in)` with any strides but the last and `B: (S, out, r_max)`
with any strides (the paged slot memory of `lora.py` gives views whose neighbouring slots overlap, and keeps B
rank-major, `(R, out)` per slot, so that a slot's B is read along `out`, in whole rows), and a batch carries one slot
per token (-1: no adapter). These kernels compute what `loramux.server.layers.lora` computes with gather + bmm,
through one of two paths:

- gather (small decode batches): one program per token, reading that token's own slot's A rows / B columns. No
  sorting; best when few tokens share a slot.
- segment (larger batches, prefill): tokens grouped by slot (`plan_segments`, once per batch) and cut into blocks of
  up to BLOCK_M tokens of one slot, each block going through the tensor cores, so a slot's A and B are read once per
  block of tokens. A program takes every P-th of the plan's blocks (`SHRINK_PROGRAMS_PER_SM`,
  `EXPAND_PROGRAMS_PER_SM`) and stops at the plan's count; a shrink program one chunk of 16 of A's rows (those below
  the slot's true rank) over a share of the input (the reduction split across programs), an expand program every
  Q-th tile of its output (`EXPAND_TILES_PER_PROGRAM`).

A slot's rows past its true rank are never read: every load is masked by the slot's rank, and expand's loop stops at
the rank (compute and bytes bounded by each adapter's real rank; the rows past it may be another slot's).

Groups fuse q/k/v (or gate/up): A of the G modules as `(S, G, r_max, in)` (or concatenated along rank, `(S, G·r_max,
in)`) gives `h: (T, G·r_max)` in one shrink, and `expand_fused` writes group g's columns of h through its own B into
its own output, in one launch.

Every launch takes only device tensors and shapes, so a step that calls them is CUDA-graph capturable (no host sync,
no data-dependent Python); Triton compiles on first use, so warm up before capturing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

# The gather path wins while a batch has few tokens per slot; above this many tokens the segment path is taken.
# Measured on an H100 (`loadtests/bench_lora_kernels.py`): over 32 adapters gather wins at 32 tokens, segment at 256
# (up to 4x).
GATHER_MAX_TOKENS = 64

Path = Literal["auto", "gather", "segment"]


@dataclass(frozen=True)
class Segments:
    """Tokens grouped by slot: slot s's tokens are `order[starts[s]:starts[s + 1]]`, cut into blocks of `block_m`.

    order: (T,) int64 token indices sorted by slot (tokens with no adapter first, where no segment reads them).
    starts: (S + 1,) int64 segment boundaries in `order`.
    blocks: (max blocks, 3) int32, one row per block: (slot, first row in `order`, rows left in the segment from
    there), numbered slot after slot; slot S marks a row with no block (there are rows for the most blocks T tokens
    over S slots can need).
    count: (1,) int32, how many rows hold a block: the segment kernels stop there, without reading the rest.
    """

    order: torch.Tensor
    starts: torch.Tensor
    blocks: torch.Tensor
    count: torch.Tensor
    block_m: int


def _segment_block_m(tokens: int) -> int:
    # Decode-sized batches spread few tokens over each slot: a smaller block wastes fewer masked rows.
    return 16 if tokens <= 256 else 64


def _max_blocks(tokens: int, num_slots: int, block_m: int) -> int:
    return triton.cdiv(tokens, block_m) + min(num_slots, tokens)


def plan_segments(token_slots: torch.Tensor, num_slots: int) -> Segments:
    """Group a batch's tokens by slot and cut the groups into the segment kernels' blocks, on the device (no host
    synchronisation). Build once per batch and pass to every layer's calls: each program then reads its block's
    three numbers instead of working them out from every slot's bounds."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be at least 1, got {num_slots}")
    tokens, device = token_slots.shape[0], token_slots.device
    sorted_slots, order = torch.sort(token_slots, stable=True)
    starts = torch.searchsorted(sorted_slots, torch.arange(num_slots + 1, device=device, dtype=sorted_slots.dtype))
    block_m = _segment_block_m(tokens)
    per_slot = (starts[1:] - starts[:-1] + block_m - 1) // block_m  # (S,) blocks of each slot
    ends = torch.cumsum(per_slot, 0)  # blocks of slots 0..s
    ids = torch.arange(_max_blocks(tokens, num_slots, block_m), device=device, dtype=ends.dtype)
    slot = torch.searchsorted(ends, ids, right=True)  # S past the last block
    held = slot.clamp(max=num_slots - 1)
    row0 = starts[held] + (ids - ends[held] + per_slot[held]) * block_m
    blocks = torch.stack((slot, row0, starts[held + 1] - row0), dim=1).to(torch.int32)
    return Segments(order=order, starts=starts, blocks=blocks, count=ends[-1:].to(torch.int32), block_m=block_m)


@triton.jit
def _rank_of(ranks_ptr, s, g, stride_rs, stride_rg, R_MAX, HAS_RANKS: tl.constexpr):
    """Slot s's true rank in group g, at most r_max (without ranks: r_max)."""
    if HAS_RANKS:
        return tl.minimum(tl.load(ranks_ptr + s * stride_rs + g * stride_rg).to(tl.int32), R_MAX)
    return R_MAX


@triton.jit(do_not_specialize=["SPLIT_K"])
def _shrink_gather_kernel(
    x_ptr, a_ptr, slots_ptr, ranks_ptr, h_ptr,
    K, R_MAX, stride_xt, stride_as, stride_ag, stride_ar, stride_ht, stride_rs, stride_rg,
    SPLIT_K, HAS_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid: (T, SPLIT_K, groups); h[t, g·r_max + r] = Σ_k x[t, k] · A[s, g, r, k]
    t = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    s = tl.load(slots_ptr + t).to(tl.int64)
    if s < 0:
        return
    rank = _rank_of(ranks_ptr, s, g, stride_rs, stride_rg, R_MAX, HAS_RANKS)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    rows = g * R_MAX + offs_r  # columns of h
    a_rows = a_ptr + s * stride_as + g * stride_ag + offs_r[:, None] * stride_ar  # (BLOCK_R, 1)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xk = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
        ak = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_K)
        acc += ak.to(tl.float32) * xk[None, :]
    out = tl.sum(acc, axis=1)  # (BLOCK_R,)
    h_ptrs = h_ptr + t * stride_ht + rows
    if SPLIT_K == 1:
        tl.store(h_ptrs, out, mask=r_mask)
    else:
        tl.atomic_add(h_ptrs, out, mask=r_mask)


@triton.jit
def _segment_block_at(block, blocks_ptr):
    """Which slot's segment, and which rows of it, block number `block` of the plan is (from `Segments.blocks`):
    (slot, first row in `order`, rows left in the segment from there)."""
    row = blocks_ptr + block * 3
    return tl.load(row), tl.load(row + 1), tl.load(row + 2)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _shrink_segment_kernel(
    x_ptr, a_ptr, order_ptr, blocks_ptr, count_ptr, ranks_ptr, h_ptr,
    K, R_MAX, stride_xt, stride_as, stride_ag, stride_ar, stride_ht, stride_rs, stride_rg,
    SPLIT_K, HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid: (P programs over the plan's blocks, SPLIT_K, groups x rank chunks of BLOCK_R). Program p takes blocks p,
    # p + P, ... of the plan's count: (BLOCK_M tokens of one slot) x A[s, g, r0:r0 + BLOCK_R]ᵀ over its share of the
    # input, where r0 lies below the slot's rank (chunks past it have nothing to do).
    pid_k = tl.program_id(1)
    chunks = tl.cdiv(R_MAX, BLOCK_R)
    g = (tl.program_id(2) // chunks).to(tl.int64)
    r0 = (tl.program_id(2) % chunks) * BLOCK_R
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    step = tl.num_programs(0)
    count = tl.load(count_ptr)
    block = tl.program_id(0)
    while block < count:
        s, row0, rows_left = _segment_block_at(block, blocks_ptr)
        slot = s.to(tl.int64)
        rank = _rank_of(ranks_ptr, slot, g, stride_rs, stride_rg, R_MAX, HAS_RANKS)
        if r0 < rank:
            m_mask = offs_m < rows_left
            tokens = tl.load(order_ptr + row0 + offs_m, mask=m_mask, other=0).to(tl.int64)  # (BLOCK_M,)
            r_mask = offs_r < rank
            x_rows = x_ptr + tokens[:, None] * stride_xt  # (BLOCK_M, 1)
            a_cols = a_ptr + slot * stride_as + g * stride_ag + offs_r[None, :] * stride_ar  # (1, BLOCK_R): Aᵀ
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                acc = tl.dot(xt, at.to(xt.dtype), acc, input_precision=PRECISION)
            h_ptrs = h_ptr + tokens[:, None] * stride_ht + g * R_MAX + offs_r[None, :]  # columns of h
            mask = m_mask[:, None] & r_mask[None, :]
            if SPLIT_K == 1:
                tl.store(h_ptrs, acc, mask=mask)
            else:
                tl.atomic_add(h_ptrs, acc, mask=mask)
        block += step


@triton.jit
def _group_target(
    g, y0, y1, y2, b0, b1, b2, n0, n1, n2, syt0, syt1, syt2, sbs0, sbs1, sbs2, sbn0, sbn1, sbn2, sbr0, sbr1, sbr2
):  # fmt: skip
    """Group g's output and B: (y pointer, B pointer, out features, y row stride, B's slot, out and rank strides)."""
    y_ptr = y0
    b_ptr = b0
    if g == 1:
        y_ptr = y1
        b_ptr = b1
    if g == 2:
        y_ptr = y2
        b_ptr = b2
    n = tl.where(g == 0, n0, tl.where(g == 1, n1, n2))
    syt = tl.where(g == 0, syt0, tl.where(g == 1, syt1, syt2))
    sbs = tl.where(g == 0, sbs0, tl.where(g == 1, sbs1, sbs2))
    sbn = tl.where(g == 0, sbn0, tl.where(g == 1, sbn1, sbn2))
    sbr = tl.where(g == 0, sbr0, tl.where(g == 1, sbr1, sbr2))
    return y_ptr, b_ptr, n, syt.to(tl.int64), sbs.to(tl.int64), sbn.to(tl.int64), sbr.to(tl.int64)


@triton.jit
def _expand_gather_kernel(
    h_ptr, slots_ptr, ranks_ptr, scalings_ptr,
    y0, y1, y2, b0, b1, b2, n0, n1, n2, syt0, syt1, syt2, sbs0, sbs1, sbs2, sbn0, sbn1, sbn2, sbr0, sbr1, sbr2,
    R_MAX, stride_ht, stride_rs, stride_rg, stride_cs, stride_cg,
    HAS_RANKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # grid: (T, blocks of the widest output, groups); y_g[t, n] += s_g · Σ_r h[t, g·r_max + r] · B_g[s, n, r]
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    s = tl.load(slots_ptr + t).to(tl.int64)
    if s < 0:
        return
    y_ptr, b_ptr, n_out, syt, sbs, sbn, sbr = _group_target(
        g, y0, y1, y2, b0, b1, b2, n0, n1, n2, syt0, syt1, syt2, sbs0, sbs1, sbs2, sbn0, sbn1, sbn2, sbr0, sbr1, sbr2
    )
    if pid_n * BLOCK_N >= n_out:
        return
    rank = _rank_of(ranks_ptr, s, g, stride_rs, stride_rg, R_MAX, HAS_RANKS)
    if rank <= 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    hv = tl.load(h_ptr + t * stride_ht + g * R_MAX + offs_r, mask=r_mask, other=0.0).to(tl.float32)  # (BLOCK_R,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    b_ptrs = b_ptr + s * sbs + offs_n[:, None] * sbn + offs_r[None, :] * sbr
    bt = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
    scaling = tl.load(scalings_ptr + s * stride_cs + g * stride_cg).to(tl.float32)
    delta = tl.sum(bt.to(tl.float32) * hv[None, :], axis=1) * scaling  # (BLOCK_N,)
    y_ptrs = y_ptr + t * syt + offs_n
    yv = tl.load(y_ptrs, mask=n_mask)
    tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=n_mask)


@triton.jit
def _expand_segment_kernel(
    h_ptr, order_ptr, blocks_ptr, count_ptr, ranks_ptr, scalings_ptr,
    y0, y1, y2, b0, b1, b2, n0, n1, n2, syt0, syt1, syt2, sbs0, sbs1, sbs2, sbn0, sbn1, sbn2, sbr0, sbr1, sbr2,
    R_MAX, stride_ht, stride_rs, stride_rg, stride_cs, stride_cg,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # grid: (P programs over the plan's blocks, Q programs over the widest output's tiles of BLOCK_N, groups). Program
    # (p, q) takes blocks p, p + P, ... of the plan's count and, of each, tiles q, q + Q, ... of its group's output:
    # (BLOCK_M tokens of one slot) x B_g[s]ᵀ, rank in 16s.
    pid_n = tl.program_id(1)
    n_stride = tl.num_programs(1) * BLOCK_N
    g = tl.program_id(2)
    y_ptr, b_ptr, n_out, syt, sbs, sbn, sbr = _group_target(
        g, y0, y1, y2, b0, b1, b2, n0, n1, n2, syt0, syt1, syt2, sbs0, sbs1, sbs2, sbn0, sbn1, sbn2, sbr0, sbr1, sbr2
    )
    if pid_n * BLOCK_N >= n_out:
        return
    offs_m = tl.arange(0, BLOCK_M)
    step = tl.num_programs(0)
    count = tl.load(count_ptr)
    block = tl.program_id(0)
    while block < count:
        s, row0, rows_left = _segment_block_at(block, blocks_ptr)
        slot = s.to(tl.int64)
        rank = _rank_of(ranks_ptr, slot, g, stride_rs, stride_rg, R_MAX, HAS_RANKS)
        if rank > 0:
            m_mask = offs_m < rows_left
            tokens = tl.load(order_ptr + row0 + offs_m, mask=m_mask, other=0).to(tl.int64)  # (BLOCK_M,)
            h_rows = h_ptr + tokens[:, None] * stride_ht + g * R_MAX  # (BLOCK_M, 1)
            scaling = tl.load(scalings_ptr + slot * stride_cs + g * stride_cg).to(tl.float32)
            for n_first in range(pid_n * BLOCK_N, n_out, n_stride):
                offs_n = n_first + tl.arange(0, BLOCK_N)
                n_mask = offs_n < n_out
                b_cols = b_ptr + slot * sbs + offs_n[None, :] * sbn  # (1, BLOCK_N): B read transposed
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                # The loop stops at this slot's rank: padded columns of B are never read.
                for r0 in range(0, rank, 16):
                    offs_r = r0 + tl.arange(0, 16)
                    r_mask = offs_r < rank
                    ht = tl.load(h_rows + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                    bt = tl.load(b_cols + offs_r[:, None] * sbr, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                    # h is fp32: tf32 keeps 10 mantissa bits of it (bf16/fp16 B is exact in tf32).
                    acc = tl.dot(ht.to(tl.float32), bt.to(tl.float32), acc, input_precision=PRECISION)
                y_ptrs = y_ptr + tokens[:, None] * syt + offs_n[None, :]
                mask = m_mask[:, None] & n_mask[None, :]
                yv = tl.load(y_ptrs, mask=mask)
                tl.store(y_ptrs, (yv.to(tl.float32) + acc * scaling).to(yv.dtype), mask=mask)
        block += step


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# A segment kernel runs about this many programs per multiprocessor, each over every P-th block of the plan, where
# the plan has more rows than that (a plan is sized for the most blocks its tokens could need over every slot page:
# 272 rows for a 256-token decode batch over 512 pages, 32 of them used by W1's 32 adapters, and a program per row
# would be a program per output tile each, 61,000 programs for gate/up). Programs past the plan's count of blocks
# return at once, but each still costs a launch: the fewer, the better, as long as enough remain for the blocks a
# batch has (each program takes its blocks one after another). Chosen on an H200 by timing a layer's four sites
# (q/k/v, o, gate/up, down) on W1's decode batch and on a W2-like one (64 adapters of ranks 8 to 64) with shrink 8 to
# 64 and expand 32 to 96 programs per multiprocessor and 1 or 2 tiles an expand program: these were the fastest in
# sum (W1's layer 89 us, 119 before the plan's count and these knobs; the others within 20%).
SHRINK_PROGRAMS_PER_SM = 24
EXPAND_PROGRAMS_PER_SM = 64

# The segment shrink takes A's rows in chunks of this many (a program per chunk below the slot's rank).
SHRINK_BLOCK_R = 16

# A segment expand program writes this many of its output's tiles for each block it takes (the block's tokens and the
# slot's rank and scaling read once for them).
EXPAND_TILES_PER_PROGRAM = 2

# The segment expand's rank loop runs once or a few times (rank 16 to 64, 16 at a time): software pipelining would
# only cost it shared memory, and so programs resident per multiprocessor.
EXPAND_STAGES = 1


def _block_programs(max_blocks: int, per_block: int, per_sm: int, device: torch.device) -> int:
    """P, the programs over a plan's `max_blocks` rows in a segment kernel whose grid has `per_block` programs (output
    tiles or reduction splits, x groups) for each, for about `per_sm` programs per multiprocessor."""
    return max(1, min(max_blocks, triton.cdiv(per_sm * _sm_count_of(device), per_block)))


def _sm_count_of(device: torch.device) -> int:
    """The device's multiprocessors; 1 on the CPU (Triton's interpreter: none to fill)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _programs_wanted(device: torch.device) -> int:
    """About two programs per multiprocessor keeps every one busy while loads are in flight."""
    return 2 * _sm_count_of(device)


def _precision(dtype: torch.dtype) -> str:
    """Tensor-core input precision: fp32 operands keep full fp32 products rather than tf32's 10 mantissa bits."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(n))


def _per_slot(values: torch.Tensor | None, name: str, num_slots: int, groups: int) -> tuple[int, int]:
    """Strides (per slot, per group) of a (S,) or (S, groups) per-slot tensor; (S,) applies to every group."""
    if values is None:
        return 0, 0
    if values.dim() == 1 and values.shape[0] == num_slots:
        return values.stride(0), 0
    if values.dim() == 2 and tuple(values.shape) == (num_slots, groups):
        return values.stride(0), values.stride(1)
    raise ValueError(f"{name} must have shape ({num_slots},) or ({num_slots}, {groups}), got {tuple(values.shape)}")


def _check_slots(token_slots: torch.Tensor, tokens: int, device: torch.device) -> None:
    if token_slots.shape != (tokens,) or token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"token_slots must be ({tokens},) int32/int64, got {tuple(token_slots.shape)} {token_slots.dtype}"
        )
    if token_slots.device != device:
        raise ValueError(f"token_slots is on {token_slots.device}, the activations on {device}")


def _choose_path(path: Path, segments: Segments | None, tokens: int) -> str:
    if path not in ("auto", "gather", "segment"):
        raise ValueError(f"path must be 'auto', 'gather' or 'segment', got {path!r}")
    if path == "auto":
        return "segment" if segments is not None or tokens > GATHER_MAX_TOKENS else "gather"
    return path


def shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    token_slots: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    groups: int = 1,
    segments: Segments | None = None,
    path: Path = "auto",
) -> torch.Tensor:
    """h = x · A[slot]ᵀ per token, in float32; rows of tokens with slot -1 are zero.

    x: (T, in) bf16/fp16/fp32 activations. a: (S, groups·r_max, in), for groups > 1 the A stacks of the fused modules
    (q, k, v) concatenated along rank, or (S, groups, r_max, in) with any strides but the last (the paged slot
    memory's view: neighbouring slots' rows may overlap, each slot's rows past its rank are never read).
    token_slots: (T,) int32/int64, -1 = no adapter. ranks: (S,) or (S, groups) int32, each slot's true rank (None:
    r_max); columns of h past it are zero. segments: from `plan_segments`, forces the segment path and saves the
    sort. Returns h: (T, groups·r_max) float32.
    """
    if a.dim() == 4:
        if groups not in (1, a.shape[1]):
            raise ValueError(f"a 4-D A has its groups in dimension 1 ({a.shape[1]}), got groups={groups}")
        groups = a.shape[1]
    elif a.dim() == 3:
        if groups not in (1, 2, 3) or a.shape[1] % groups:
            raise ValueError(f"groups must be 1, 2 or 3 and divide A's rank dimension {a.shape[1]}, got {groups}")
        a = (a if a.stride(2) == 1 else a.contiguous()).unflatten(1, (groups, a.shape[1] // groups))
    if x.dim() != 2 or a.dim() != 4 or a.shape[3] != x.shape[1] or groups not in (1, 2, 3):
        raise ValueError(
            f"shrink needs x (T, in) and a (S, r, in) or (S, groups <= 3, r, in), got {tuple(x.shape)} and "
            f"{tuple(a.shape)}"
        )
    if a.stride(3) != 1:
        raise ValueError("shrink needs A's rows contiguous (stride 1 along the last dimension)")
    tokens, k = x.shape
    num_slots, r_max = a.shape[0], a.shape[2]
    _check_slots(token_slots, tokens, x.device)
    stride_rs, stride_rg = _per_slot(ranks, "ranks", num_slots, groups)
    x = x if x.stride(1) == 1 else x.contiguous()
    h = torch.zeros(tokens, groups * r_max, device=x.device, dtype=torch.float32)
    if tokens == 0:
        return h
    block_r = _pow2_at_least(r_max, 16)
    chosen = _choose_path(path, segments, tokens)
    if chosen == "gather":
        # A (BLOCK_R, BLOCK_K) tile of about 4096 fp32 accumulators: 32 registers a thread at 4 warps.
        block_k = min(max(4096 // block_r, 32), triton.next_power_of_2(k))
        split_k = _split_k(_programs_wanted(x.device), tokens * groups, triton.cdiv(k, block_k))
        _shrink_gather_kernel[(tokens, split_k, groups)](
            x, a, token_slots, ranks if ranks is not None else token_slots, h,
            k, r_max, x.stride(0), a.stride(0), a.stride(1), a.stride(2), h.stride(0), stride_rs, stride_rg,
            split_k, HAS_RANKS=ranks is not None, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
        return h
    segments = _checked_plan(segments, token_slots, num_slots)
    # Rank in chunks of 16, one program each, so that the work follows each slot's true rank rather than r_max. The
    # reduction is split so that the blocks a batch has at fewest (its tokens in one slot) fill the device: a decode
    # batch of 256 tokens makes 16 to 48 blocks, and a program that alone walks 14,336 inputs leaves it idle.
    block_k, chunks = 128, triton.cdiv(r_max, SHRINK_BLOCK_R)
    max_blocks = segments.blocks.shape[0]
    fewest_blocks = triton.cdiv(tokens, segments.block_m)
    split_k = _split_k(_programs_wanted(x.device), fewest_blocks * groups, triton.cdiv(k, block_k))
    programs = _block_programs(max_blocks, split_k * groups * chunks, SHRINK_PROGRAMS_PER_SM, x.device)
    _shrink_segment_kernel[(programs, split_k, groups * chunks)](
        x, a, segments.order, segments.blocks, segments.count, ranks if ranks is not None else token_slots, h,
        k, r_max, x.stride(0), a.stride(0), a.stride(1), a.stride(2), h.stride(0), stride_rs, stride_rg, split_k,
        HAS_RANKS=ranks is not None, PRECISION=_precision(x.dtype), BLOCK_M=segments.block_m, BLOCK_R=SHRINK_BLOCK_R,
        BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return h


def _checked_plan(segments: Segments | None, token_slots: torch.Tensor, num_slots: int) -> Segments:
    """The batch's plan (made here when the caller has none), checked to be for this many tokens and slots."""
    if segments is None:
        return plan_segments(token_slots, num_slots)
    tokens = token_slots.shape[0]
    if segments.starts.shape[0] != num_slots + 1 or segments.order.shape[0] != tokens:
        raise ValueError(
            f"segments were planned for {segments.order.shape[0]} tokens over {segments.starts.shape[0] - 1} slots, "
            f"the call has {tokens} over {num_slots}"
        )
    return segments


def _split_k(wanted: int, programs: int, k_blocks: int) -> int:
    """Split the reduction over `in` when too few programs would run; partial sums meet by atomic adds."""
    if programs >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, programs), k_blocks, 16))


def expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    scalings: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    segments: Segments | None = None,
    path: Path = "auto",
) -> None:
    """y[t] += scalings[s] · h[t] · B[s]ᵀ in place, for every token t whose slot s = token_slots[t] >= 0.

    y: (T, out), rows may be strided (a view into a wider output) but each row contiguous. h: (T, r_max), float32
    from `shrink` (or y's dtype). b: (S, out, r_max), any strides. scalings: (S,) float32. ranks, segments, path:
    as in `shrink`.
    """
    expand_fused([y], h, [b], token_slots, scalings, ranks=ranks, segments=segments, path=path)


def expand_fused(
    ys: Sequence[torch.Tensor],
    h: torch.Tensor,
    bs: Sequence[torch.Tensor],
    token_slots: torch.Tensor,
    scalings: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    segments: Segments | None = None,
    path: Path = "auto",
) -> None:
    """The expand of fused modules in one launch: ys[g][t] += scalings[s, g] · h[t, g·r_max:(g+1)·r_max] · bs[g][s]ᵀ.

    ys: G outputs (T, out_g); h: (T, G·r_max) from `shrink(..., groups=G)`; bs: G stacks (S, out_g, r_max);
    scalings and ranks: (S,) for all groups or (S, G) per group (rank_pattern / alpha_pattern, a module an adapter does
    not target has rank 0 there).
    """
    groups = len(ys)
    if groups not in (1, 2, 3) or len(bs) != groups:
        raise ValueError(f"expand takes 1 to 3 outputs with one B each, got {len(ys)} outputs and {len(bs)} B stacks")
    tokens = h.shape[0]
    num_slots, r_max = bs[0].shape[0], bs[0].shape[2]
    if h.dim() != 2 or h.shape[1] != groups * r_max:
        raise ValueError(f"h must be ({tokens}, {groups * r_max}) for {groups} group(s) of rank {r_max}")
    for y, b in zip(ys, bs, strict=True):
        if y.dim() != 2 or b.dim() != 3 or y.shape[0] != tokens or tuple(b.shape) != (num_slots, y.shape[1], r_max):
            raise ValueError(f"expand needs y ({tokens}, out) and b ({num_slots}, out, {r_max}) per group, "
                             f"got {tuple(y.shape)} and {tuple(b.shape)}")  # fmt: skip
        if y.stride(1) != 1:
            raise ValueError("expand needs y's rows contiguous (stride 1 along the last dimension)")
        if y.device != h.device or b.device != h.device:
            raise ValueError("y, h and B must be on one device")
    _check_slots(token_slots, tokens, h.device)
    stride_rs, stride_rg = _per_slot(ranks, "ranks", num_slots, groups)
    stride_cs, stride_cg = _per_slot(scalings, "scalings", num_slots, groups)
    if tokens == 0:
        return
    h = h if h.stride(1) == 1 else h.contiguous()
    pad = 3 - groups  # unused groups repeat group 0; the grid never reaches them
    ys3, bs3 = [*ys, *[ys[0]] * pad], [*bs, *[bs[0]] * pad]
    targets = (
        *ys3, *bs3, *(y.shape[1] for y in ys3), *(y.stride(0) for y in ys3),
        *(b.stride(0) for b in bs3), *(b.stride(1) for b in bs3), *(b.stride(2) for b in bs3),
    )  # fmt: skip
    widest = max(y.shape[1] for y in ys)
    rank_arg = ranks if ranks is not None else token_slots
    chosen = _choose_path(path, segments, tokens)
    if chosen == "gather":
        block_r = _pow2_at_least(r_max, 16)
        block_n = min(max(4096 // block_r, 32), triton.next_power_of_2(widest))
        _expand_gather_kernel[(tokens, triton.cdiv(widest, block_n), groups)](
            h, token_slots, rank_arg, scalings, *targets,
            r_max, h.stride(0), stride_rs, stride_rg, stride_cs, stride_cg,
            HAS_RANKS=ranks is not None, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip
        return
    segments = _checked_plan(segments, token_slots, num_slots)
    block_n = 128
    max_blocks = segments.blocks.shape[0]
    tile_programs = triton.cdiv(triton.cdiv(widest, block_n), EXPAND_TILES_PER_PROGRAM)
    programs = _block_programs(max_blocks, tile_programs * groups, EXPAND_PROGRAMS_PER_SM, h.device)
    _expand_segment_kernel[(programs, tile_programs, groups)](
        h, segments.order, segments.blocks, segments.count, rank_arg, scalings, *targets,
        r_max, h.stride(0), stride_rs, stride_rg, stride_cs, stride_cg,
        HAS_RANKS=ranks is not None, PRECISION=_precision(bs[0].dtype), BLOCK_M=segments.block_m,
        BLOCK_N=block_n, num_warps=4, num_stages=EXPAND_STAGES,
    )  # fmt: skip
