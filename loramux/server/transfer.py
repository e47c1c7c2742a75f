"""Moving a step's small host-built tensors (token ids, positions, cache indices, ...) to the device.

A plain `.to("cuda")` of a tensor in pageable memory makes the host wait until the device has finished everything
queued before it: in an eager step that waits out the step's own earlier kernels (or, in a mixed step, the whole
decode graph replayed before the prompt chunks), so the host cannot queue the next kernels while the device runs.
`to_device` packs the tensors into one page-locked buffer from torch's caching host allocator and copies it
asynchronously: one copy instead of one per tensor, and no wait. The allocator does not hand the buffer out again
until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The host `tensors` (one dtype, any shapes) on `device`, in order. On a GPU: one asynchronous copy of them all
    (each result is a view into one device buffer); elsewhere `.to(device)` each."""
    if not tensors:
        return []
    dtype = tensors[0].dtype
    if any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        raise ValueError("to_device takes host tensors of one dtype")
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    sizes = [t.numel() for t in tensors]
    staged = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
    torch.cat([t.reshape(-1) for t in tensors], out=staged)
    moved = staged.to(device, non_blocking=True)
    return [piece.view(t.shape) for piece, t in zip(moved.split(sizes), tensors, strict=True)]
