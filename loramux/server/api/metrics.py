"""Prometheus metrics. Request-level series are recorded by the routes; engine state (queue, KV cache, slots,
adapter cache) is asked of the engine process at scrape time, so it is never stale. With several API processes
(`PROMETHEUS_MULTIPROC_DIR` set by their parent) every process records into files there and a scrape of any of
them adds up all of them (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
OTHER = "other"


class BoundedLabel:
    """Keeps a label's set of values bounded: the first `limit` distinct values are kept, later ones become
    "other", so a flood of adapter or tenant names cannot blow up the number of series."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


class _EngineStatsCollector:
    def __init__(self, stats: Mapping[str, float]) -> None:
        self._stats = stats

    def collect(self):
        for key, value in sorted(self._stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"loramux_{key}", f"engine statistic {key}", value=float(value))


class Metrics:
    def __init__(self, label_limit: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = BoundedLabel(label_limit)
        self.tenant_label = BoundedLabel(label_limit)
        r = self.registry
        self.requests = Counter(
            "loramux_requests", "HTTP requests on the inference routes", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "loramux_time_to_first_token_seconds",
            "time to first token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loramux_time_per_output_token_seconds",
            "mean time per output token after the first",
            ["adapter"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "loramux_request_latency_seconds",
            "end-to-end request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loramux_prompt_tokens", "prompt tokens processed", ["tenant", "adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "loramux_generation_tokens", "tokens generated", ["tenant", "adapter"], registry=r
        )
        self.aborted = Counter(
            "loramux_requests_aborted", "generations cut short (client disconnect, shutdown)", ["reason"], registry=r
        )

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_abort(self, reason: str) -> None:
        self.aborted.labels(reason).inc()

    def observe_generation(
        self,
        *,
        tenant: str,
        adapter: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        total: float,
    ) -> None:
        """One engine request (one choice) finished: its tokens, time to first token and time per output token."""
        adapter_l, tenant_l = self.adapter_label(adapter), self.tenant_label(tenant)
        self.prompt_tokens.labels(tenant_l, adapter_l).inc(prompt_tokens)
        self.generation_tokens.labels(tenant_l, adapter_l).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(adapter_l).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(adapter_l).observe((total - ttft) / (completion_tokens - 1))

    def render(self, engine_stats: Mapping[str, float]) -> bytes:
        """The exposition text: this process's series (every API process's, in multiprocess mode) and the engine's
        counters as gauges."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = CollectorRegistry()
            registry.register(_OwnSeries(self.registry))
        registry.register(_EngineStatsCollector(engine_stats))
        return generate_latest(registry)


class _OwnSeries:
    """This process's own series, for a scrape's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):
        return self._registry.collect()
