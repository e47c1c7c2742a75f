"""Fixtures of the reliability tests: a real `loramux serve` on a tiny random base (shared by the bad-input, fault and
fuzz tests), huggingface_hub pointed at it, and PEFT-format adapters written directly with numpy (no model load)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import HfApi
from safetensors.numpy import save_file

from loadtests.tiny_model import make_tiny_checkpoint
from tests.server.api.serving import Server, launch

# (out, in) of each projection of make_tiny_checkpoint's default config: hidden 64, 4 heads of 16, 2 KV heads, MLP 128.
TINY_DIMS = {
    "q_proj": (64, 64),
    "k_proj": (32, 64),
    "v_proj": (32, 64),
    "o_proj": (64, 64),
    "gate_proj": (128, 64),
    "up_proj": (128, 64),
    "down_proj": (64, 128),
}
TINY_LAYERS = 2
TINY_MAX_RANK = 8  # --max-lora-rank of the shared tiny server


def write_adapter(
    directory: Path,
    dims: dict[str, tuple[int, int]] = TINY_DIMS,
    layers: int = TINY_LAYERS,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.05,
) -> Path:
    """A PEFT LoRA adapter directory (config + safetensors) with random A (r, in) and B (out, r) per module."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for target in targets:
            out_features, in_features = dims[target]
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, scale, (r, in_features)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, scale, (out_features, r)).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def hub_client_env() -> Iterator[None]:
    """huggingface_hub may talk to the local test servers (the session is offline otherwise), with Xet on as users
    have it."""
    import huggingface_hub.constants as hf_constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        patch.setenv("HF_HUB_DISABLE_XET", "")  # recorded, so that the variable is removed again afterwards
        patch.delenv("HF_HUB_DISABLE_XET")
        patch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
        yield


def start_tiny_server(root: Path, *extra: str) -> Server:
    """`loramux serve` (single-user mode) over a tiny random base in `root`; its data dir is `root / "data"`."""
    base = root / "tiny"
    if not base.exists():
        make_tiny_checkpoint(base, max_position_embeddings=256)
    return launch(
        root / "home", "--base", str(base), "--data-dir", str(root / "data"), "--slots", "2",
        "--max-lora-rank", str(TINY_MAX_RANK), "--max-num-seqs", "4", "--max-model-len", "128", *extra,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, hub_client_env) -> Iterator[SimpleNamespace]:
    """One tiny server for the bad-input, fault and fuzz tests; it must still be healthy when they are done."""
    root = tmp_path_factory.mktemp("reliability")
    server = start_tiny_server(root)
    api = HfApi(endpoint=server.url, token="single-user")
    yield SimpleNamespace(url=server.url, server=server, api=api, root=root, data=root / "data")
    assert server.process.poll() is None, server.output()  # nothing crashed it
    assert server.stop() == 0, server.output()


def push(api: HfApi, directory: Path, repo: str) -> str:
    """Create `repo` if needed and upload `directory` as a new revision; returns the commit id."""
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(folder_path=str(directory), repo_id=repo).oid
