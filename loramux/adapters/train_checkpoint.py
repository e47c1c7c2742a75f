"""Training checkpoints: the adapter, the optimizer state and the step, written so that a crash at any moment leaves
the last complete checkpoint readable. Tensors go to safetensors and the rest to JSON: nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_PREFIX = "step-"
_TENSOR = "__tensor__"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # trainer_state.json: fingerprint, step, epoch, optimizer's non-tensor state


def latest_checkpoint(checkpoints_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint (folders appear under their final name only once fully written)."""
    found = sorted(
        (int(p.name[len(_PREFIX) :]), p)
        for p in checkpoints_dir.glob(f"{_PREFIX}*")
        if p.name[len(_PREFIX) :].isdigit() and (p / STATE_FILE).is_file()
    )
    if not found:
        return None
    step, path = found[-1]
    return Checkpoint(path=path, step=step, state=json.loads((path / STATE_FILE).read_text()))


def write_atomically(target: Path, fill: Any) -> Path:
    """Call `fill(tmp_dir)` and rename the folder to `target`, replacing an older one; never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_checkpoint(
    checkpoints_dir: Path, step: int, save_adapter: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write `step-N` (adapter via `save_adapter(dir)`, optimizer, `state`), then drop older checkpoints."""

    def fill(tmp: Path) -> None:
        save_adapter(tmp)
        tensors, rest = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        # Written last: its presence marks the checkpoint complete.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": rest}, indent=2))

    path = write_atomically(checkpoints_dir / f"{_PREFIX}{step:07d}", fill)
    for older in checkpoints_dir.glob(f"{_PREFIX}*"):
        if older != path:
            shutil.rmtree(older, ignore_errors=True)
    return path


def load_optimizer_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(str(checkpoint.path / OPTIMIZER_FILE))
    rest = checkpoint.state["optimizer"]
    state = {int(index): _restore(entry, tensors) for index, entry in rest["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # torch AdamW keeps {"step": tensor(), "exp_avg", "exp_avg_sq"} per parameter; bitsandbytes' paged AdamW
    # {"step": int, "state1", "state2"}, with some tensors nested one dict deeper. Each tensor goes to safetensors
    # as "state.<param index>.<key path>" and is replaced in the JSON by {"__tensor__": that name}.
    tensors: dict[str, torch.Tensor] = {}

    def strip(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").contiguous()
            return {_TENSOR: name}
        if isinstance(value, dict):
            return {str(k): strip(v, f"{name}.{k}") for k, v in value.items()}
        return value

    plain = {str(index): strip(entry, f"state.{index}") for index, entry in state_dict["state"].items()}
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def _restore(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _restore(v, tensors) for k, v in value.items()}
    return value
