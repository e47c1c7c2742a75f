"""The deployment's /metrics: every replica's and ingress's series added up, as one server's would read."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]' (the ray extra)")

from loramux.cluster.metrics import merge
from loramux.server.api.metrics import Metrics
from tests.server.api.serving import metric


def exposition(requests: dict[tuple[str, int], int], latencies: list[float], stats: dict[str, float]) -> str:
    metrics = Metrics()
    for (endpoint, status), count in requests.items():
        for _ in range(count):
            metrics.observe_request(endpoint, status, 0.01)
    for seconds in latencies:
        metrics.ttft.labels(adapter="base").observe(seconds)
    return metrics.render(stats).decode()


def test_counters_histograms_and_engine_gauges_add_up_across_sources():
    texts = {
        "replica:a": exposition({("chat", 200): 3, ("chat", 404): 1}, [0.02, 0.3], {"requests_running": 2}),
        "replica:b": exposition({("chat", 200): 2, ("completions", 200): 5}, [0.02], {"requests_running": 1}),
        "ingress:x": exposition({("chat", 429): 4}, [], {}),
    }
    text = merge(texts).decode()
    assert metric(text, "loramux_requests_total", endpoint="chat", status="200") == 5
    assert metric(text, "loramux_requests_total", endpoint="chat", status="404") == 1
    assert metric(text, "loramux_requests_total", endpoint="chat", status="429") == 4
    assert metric(text, "loramux_requests_total", endpoint="completions", status="200") == 5
    assert metric(text, "loramux_time_to_first_token_seconds_count", adapter="base") == 3
    assert metric(text, "loramux_time_to_first_token_seconds_bucket", adapter="base", le="0.025") == 2
    assert metric(text, "loramux_time_to_first_token_seconds_bucket", adapter="base", le="+Inf") == 3
    assert metric(text, "loramux_requests_running") == 3
    assert metric(text, "loramux_replicas") == 2  # the ingress is no replica
    created = [line for line in text.splitlines() if line.startswith("loramux_requests_created{")]
    assert created and all(1e9 < float(line.rpartition(" ")[2]) <= time.time() for line in created)  # not a sum


def test_no_source_gives_zero_replicas():
    assert metric(merge({}).decode(), "loramux_replicas") == 0
