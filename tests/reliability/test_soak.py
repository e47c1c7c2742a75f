"""Soak: the real SmolLM2 behind `loramux serve`, three adapters pushed by two tenants, the load generator at a fixed
concurrency with short outputs for SOAK_SECONDS. No request may fail, the server's memory must level off after the
warm-up, and at the end every request, KV block and adapter slot must be free again."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx
import pytest
from huggingface_hub import HfApi

from loadtests.loadgen import LoadConfig, run_load
from loadtests.workload import LengthDist, Tenant, Workload
from loramux.core.model_config import ModelConfig
from loramux.registry.registry import Registry
from tests.reliability.conftest import push, write_adapter
from tests.server.api.serving import launch, metric

SOAK_SECONDS = 100
CONCURRENCY = 4
MiB = 1 << 20


class RssSampler(threading.Thread):
    """Reads a process's resident set size (VmRSS in /proc/PID/status) twice a second: [(seconds, bytes)]."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.done = pid, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(0.5):
            with open(f"/proc/{self.pid}/status") as status:
                kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            self.samples.append((time.monotonic() - self.t0, kib * 1024))

    def window(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t < end]


@pytest.mark.slow
def test_soak_on_smollm2_no_failures_flat_memory_everything_freed(default_base_dir, hub_client_env, tmp_path):
    config = ModelConfig.from_dict(json.loads((default_base_dir / "config.json").read_text()))
    dims = {
        "q_proj": (config.q_size, config.hidden_size),
        "v_proj": (config.kv_size, config.hidden_size),
        "o_proj": (config.hidden_size, config.q_size),
        "down_proj": (config.hidden_size, config.intermediate_size),
    }
    registry = Registry.open(tmp_path / "data")
    keys = {}
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
        keys[tenant] = registry.create_key(tenant)[1]
    server = launch(
        tmp_path / "home", "--base", str(default_base_dir), "--data-dir", str(tmp_path / "data"),
        "--slots", "1", "--max-lora-rank", "16", "--max-num-seqs", "8",
    )  # fmt: skip
    try:
        # One rank-16 slot (two pages of rank 8) holds acme/legal, or the two others side by side: they rotate.
        adapters = {
            "acme/support": ("acme", dict(r=8, targets=("q_proj", "v_proj"))),
            "acme/legal": ("acme", dict(r=16, targets=("q_proj", "v_proj", "o_proj", "down_proj"))),
            "globex/chat": ("globex", dict(r=4, targets=("v_proj", "down_proj"))),
        }
        for repo, (owner, shape) in adapters.items():
            directory = write_adapter(tmp_path / repo, dims=dims, layers=config.num_hidden_layers, scale=0.01, **shape)
            api = HfApi(endpoint=server.url, token=keys[owner])
            api.create_repo(repo, private=False)  # public: both tenants call every adapter
            push(api, directory, repo)
        base_id = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {keys['acme']}"}).json()
        base_id = base_id["data"][0]["id"]

        workload = Workload(
            models=[*adapters, base_id],
            tenants=[Tenant(name, key) for name, key in keys.items()],
            prompt_words=LengthDist.parse("uniform:5,30"),
            max_tokens=LengthDist.parse("uniform:8,16"),
            zipf_exponent=1.0,
            seed=7,
        )
        # Warm-up: every model once, so that loading adapters and first allocations happen before measuring.
        warm = LoadConfig(server.url, workload, concurrency=CONCURRENCY, requests=12, timeout_s=120)
        warm_report = asyncio.run(run_load(warm))
        assert warm_report["requests"]["failed"] == 0, warm_report["error_examples"]

        sampler = RssSampler(server.process.pid)
        sampler.start()
        load = LoadConfig(server.url, workload, concurrency=CONCURRENCY, duration_s=SOAK_SECONDS, timeout_s=120)
        report = asyncio.run(run_load(load))
        sampler.done.set()
        sampler.join()

        requests = report["requests"]
        assert requests["failed"] == 0, report["error_examples"]
        assert requests["completed"] >= 50 and requests["without_usage"] == 0
        assert {name for name, share in report["models"].items() if share["completed"]} == set(workload.models)
        assert all(share["completed"] for share in report["tenants"].values())

        # Memory: the late window's median no higher than the early one's by more than a generous margin.
        early = sampler.window(0.2 * SOAK_SECONDS, 0.45 * SOAK_SECONDS)
        late = sampler.window(0.8 * SOAK_SECONDS, SOAK_SECONDS + 30)
        growth = statistics.median(late) - statistics.median(early)
        assert growth < max(64 * MiB, 0.1 * statistics.median(early)), (growth / MiB, sampler.samples)

        # Everything given back: no request running or waiting, no KV block held, no slot pinned.
        text = httpx.get(f"{server.url}/metrics").text
        for gauge in ("requests_running", "requests_waiting", "requests_resolving", "kv_blocks_used", "slots_used"):
            assert metric(text, f"loramux_{gauge}") == 0, gauge
        assert metric(text, "loramux_kv_blocks_total") > 0 and metric(text, "loramux_slots_total") == 1
        assert metric(text, "loramux_adapter_slot_loads") > 3  # the rotation really happened
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0, server.output()
