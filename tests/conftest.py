"""Shared fixtures: a loramux home for the session, tiny random Llama-family checkpoints (built by
`loadtests.tiny_model`), the real default base."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtests.tiny_model import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
# One loramux home for the whole run, kept between local runs so the default model is converted once.
os.environ.setdefault("LORAMUX_HOME", str(REPO / ".loramux"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Xet client retries an answer of 5xx for minutes before it reports it, and reads this once per process: the tests
# that make the hub refuse an upload want the refusal, not the retries.
os.environ.setdefault("HF_XET_CLIENT_RETRY_MAX_ATTEMPTS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-gpu",
        action="store_true",
        help="stop with an error, instead of skipping the gpu tests, where there is no CUDA device or no Triton",
    )
    parser.addoption(
        "--acceptance",
        action="store_true",
        help="run the acceptance tests too: a user's whole journey on the real model (`make acceptance`)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not config.getoption("--acceptance"):
        journey = pytest.mark.skip(reason="an acceptance test (minutes of training on the CPU): make acceptance")
        for item in items:
            if "acceptance" in item.keywords:
                item.add_marker(journey)

    if config.getoption("--require-gpu"):
        from importlib.util import find_spec

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--require-gpu: torch {torch.__version__} sees no CUDA device")
        if find_spec("triton") is None:
            raise pytest.UsageError("--require-gpu: Triton is not installed (torch's CUDA build brings it)")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(arch="qwen2", **config_overrides)` -> a model directory."""
    counter = iter(range(1000))

    def make(arch: str = "llama", **overrides) -> Path:
        return make_tiny_checkpoint(tmp_path / f"{arch}-{next(counter)}", arch, **overrides)

    return make


@pytest.fixture(scope="session")
def default_base_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the session's loramux home."""
    from loramux.server.models.checkpoint import default_base_dir as resolve_default

    return resolve_default()


@pytest.fixture(scope="session")
def default_base(default_base_dir):
    """The real default base loaded in NF4 on the CPU (shared: treat as read-only)."""
    from loramux.server.models.loader import load_base

    return load_base(str(default_base_dir), device="cpu")


# --- The registry and hub: a tiny PEFT adapter and the real hub server on a free loopback port.
import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

_ADAPTERS: dict[tuple, Path] = {}


def build_adapter(checkpoint: Path, out: Path, r: int = 4, targets=("q_proj", "v_proj"), **lora) -> Path:
    """A PEFT LoRA on a tiny checkpoint, with non-zero B so that it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0, **lora)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture
def make_adapter(tiny_checkpoint, tmp_path_factory):
    """Factory: `make_adapter(r=8, ...)` -> a PEFT adapter directory, built once per distinct setting."""

    def make(r: int = 4, targets=("q_proj", "v_proj"), **lora) -> Path:
        key = (r, tuple(targets), json.dumps(lora, sort_keys=True))
        if key not in _ADAPTERS:
            if "checkpoint" not in _ADAPTERS:
                _ADAPTERS["checkpoint"] = tiny_checkpoint()
            out = tmp_path_factory.mktemp("adapter")
            _ADAPTERS[key] = build_adapter(_ADAPTERS["checkpoint"], out, r, targets, **lora)
        return _ADAPTERS[key]

    return make


@pytest.fixture
def checkpoint_dir(make_adapter) -> Path:
    make_adapter()
    return _ADAPTERS["checkpoint"]


@dataclass
class Hub:
    url: str
    registry: object
    data_dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The registry's two deployments: SQLite + a local folder (embedded), PostgreSQL + S3 (shared). Tests and fixtures
# that take `storage`, or `hub` through `@pytest.mark.parametrize("hub", STORAGES, indirect=True)`, run on both.
STORAGES = ["local", "postgres-s3"]


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster for the session, with the database `registry` at the current schema."""
    from tests.storage_services import PG_MISSING, PostgresCluster, postgres_bindir

    pytest.importorskip("psycopg", reason="the cluster extra is not installed: pip install -e '.[dev]'")
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(PG_MISSING)
    from loramux.registry import migrations

    cluster = PostgresCluster(bindir, free_port())
    try:
        cluster.start()
        cluster.execute("CREATE DATABASE registry")
        migrations.upgrade(cluster.url("registry"))
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port, with the bucket `loramux-tests`."""
    pytest.importorskip("moto", reason="moto is not installed: pip install -e '.[dev]'")
    import boto3

    from tests.storage_services import S3Server

    server = S3Server(free_port())
    server.start()
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="loramux-tests")  # fmt: skip
    yield server
    server.stop()


_PREFIXES = iter(range(1_000_000))


@pytest.fixture
def shared_storage(postgres_cluster, s3_server, monkeypatch):
    """The database emptied (faster than a new one per test) and a fresh prefix of the bucket; AWS_* set for this
    process."""
    from tests.storage_services import SharedStorage

    postgres_cluster.empty("registry")
    aws = {"AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}  # fmt: skip
    for key, value in aws.items():
        monkeypatch.setenv(key, value)
    prefix = f"registry-{os.getpid()}-{next(_PREFIXES)}"
    storage = SharedStorage(postgres_cluster.url("registry"), f"s3://loramux-tests/{prefix}", aws)
    yield storage
    storage.close()


@pytest.fixture(params=STORAGES)
def storage(request):
    """Each of the two deployments in turn: `storage.open(data_dir)` -> a Registry."""
    from tests.storage_services import LocalStorage

    if request.param == "local":
        yield LocalStorage()
    else:
        yield request.getfixturevalue("shared_storage")


@pytest.fixture
def hub(request, tmp_path, monkeypatch):
    """The real hub (uvicorn in a thread) on a fresh registry (local unless parametrized with "postgres-s3");
    huggingface_hub pointed at nothing else."""
    import huggingface_hub.constants as hf_constants
    import uvicorn

    from loramux.registry.hub import create_hub_app
    from loramux.registry.registry import Registry

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # The client as users have it: hf_xet installed and Xet on (huggingface_hub then uploads through the hub's Xet
    # routes); its cache of uploaded shards kept with the test.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "")  # recorded, so that the variable is removed again afterwards
    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    data_dir = tmp_path / "data"
    if getattr(request, "param", "local") == "local":
        registry = Registry.open(data_dir)
    else:
        registry = request.getfixturevalue("shared_storage").open(data_dir)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_hub_app(registry), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the hub did not start")
        time.sleep(0.02)
    yield Hub(f"http://127.0.0.1:{port}", registry, data_dir)
    server.should_exit = True
    thread.join(timeout=10)
