"""A step's host tensors on the device: the same values and shapes, in one copy that does not wait on a GPU."""

from __future__ import annotations

import pytest
import torch

from loramux.server.transfer import to_device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _host_tensors() -> list[torch.Tensor]:
    return [torch.arange(7), torch.tensor([[3, 1], [4, 1], [5, 9]]), torch.tensor([], dtype=torch.long), torch.ones(1)]


@pytest.mark.parametrize("device", DEVICES)
def test_values_and_shapes_arrive_in_order(device):
    tensors = [t.long() for t in _host_tensors()]
    moved = to_device(tensors, torch.device(device))
    assert len(moved) == len(tensors)
    for got, want in zip(moved, tensors, strict=True):
        assert got.device.type == device and got.shape == want.shape and got.dtype == torch.long
        assert torch.equal(got.cpu(), want)
    assert to_device([], torch.device(device)) == []


def test_tensors_of_several_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        to_device(_host_tensors(), torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_copy_leaves_the_host_free_while_the_device_is_busy():
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    to_device([torch.arange(3)], device)  # the page-locked allocator's first block outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any call that waits for the device raises
    try:
        for _ in range(8):
            busy = busy @ busy / 64
        moved = to_device([torch.arange(5), torch.tensor([[7, 8]])], device)
        total = moved[0].sum() + moved[1].sum()  # queued behind the copy, on the same stream
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(total) == 10 + 15
