"""The metrics of a deployment, as one server's: `/metrics` on the ingress adds up the series of every replica (its
requests, tokens, latencies, and its engine's gauges, asked at scrape time) and of every ingress replica (the requests
it answered itself: 413, 429, 503).

Ray Serve gives no way to call every replica of a deployment, so the processes come to the board instead: each one
waits on the board (`MetricsBoard.next_round`, a long poll) until a scrape is asked, then sends its exposition text.
A scrape wakes them all and waits, a few seconds at most, for every process that waited recently; one that did not
answer (a replica that died) is dropped until it waits again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve

log = logging.getLogger(__name__)

POLL_SECONDS = 30.0  # a process's wait on the board before it asks again (and so says that it lives)
SCRAPE_SECONDS = 5.0  # how long a scrape waits for the answers
REPLICA = "replica:"  # the prefix of a replica's source name (an ingress's is "ingress:")


@serve.deployment(name="MetricsBoard", num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=1.0, logging_config={"enable_access_log": False})  # fmt: skip
class MetricsBoard:
    """The meeting point of scrapes and the processes that answer them (one replica of its own deployment: every
    process waits on it, so its limit on requests at once is far above their number, and nothing it holds needs a
    drain when it stops)."""

    def __init__(self) -> None:
        self.round = 0
        self.asked = asyncio.Event()  # set when round `self.round` is asked; replaced by a new one each round
        self.answered = asyncio.Condition()
        self.answers: dict[str, tuple[int, str]] = {}  # source -> (the round it answered, its exposition text)
        self.seen: dict[str, float] = {}  # source -> when it last waited here (monotonic)

    async def next_round(self, source: str, done: int) -> int:
        """Wait until a round other than `done` is asked, or POLL_SECONDS pass -> the current round."""
        self.seen[source] = time.monotonic()
        if self.round == done:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.asked.wait(), POLL_SECONDS)
        self.seen[source] = time.monotonic()
        return self.round

    async def answer(self, source: str, round_: int, text: str) -> None:
        self.answers[source] = (round_, text)
        async with self.answered:
            self.answered.notify_all()

    async def scrape(self) -> dict[str, str]:
        """Ask every process for its series -> source -> exposition text, of those that answered in time."""
        self.round += 1
        wanted = self.round
        asked, self.asked = self.asked, asyncio.Event()
        asked.set()
        now = time.monotonic()
        expected = {source for source, seen in self.seen.items() if now - seen < POLL_SECONDS + SCRAPE_SECONDS}

        def complete() -> bool:
            return all(self.answers.get(source, (-1, ""))[0] >= wanted for source in expected)

        async with self.answered:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.answered.wait_for(complete), SCRAPE_SECONDS)
        texts = {s: text for s, (done, text) in self.answers.items() if s in expected and done >= wanted}
        for source in expected - texts.keys():  # gone (or stuck): not waited for again until it comes back
            log.warning("no metrics from %s within %.0f s; left out until it reports again", source, SCRAPE_SECONDS)
            self.seen.pop(source, None)
            self.answers.pop(source, None)
        return texts


async def report(board, source: str, render: Callable[[], Awaitable[str]]) -> None:
    """Answer the board's scrapes with `render()` until cancelled (a task of every replica and ingress)."""
    done = 0
    while True:
        try:
            wanted = await board.next_round.remote(source, done)
            if wanted != done:
                await board.answer.remote(source, wanted, await render())
                done = wanted
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the board restarting, say: ask again shortly
            log.warning("reporting metrics to the board failed: %s", exc)
            await asyncio.sleep(1.0)


def merge(texts: dict[str, str]) -> bytes:
    """One exposition of every source's series: samples of the same name and labels added up (counters, histograms
    and the engines' gauges, which then read as the deployment's totals; a `_created` time is the earliest), and
    `loramux_replicas`, the replicas that answered."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for family in _families(texts.values()):
        target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
        seen = values.setdefault(family.name, {})
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in seen:
                seen[key] = sample.value
            elif sample.name.endswith("_created"):
                seen[key] = min(seen[key], sample.value)
            else:
                seen[key] += sample.value
        target.samples = [Sample(name, dict(labels), value) for (name, labels), value in seen.items()]
    replicas = sum(source.startswith(REPLICA) for source in texts)
    merged["loramux_replicas"] = GaugeMetricFamily("loramux_replicas", "replicas that answered the scrape", replicas)
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


def _families(texts: Iterable[str]):
    for text in texts:
        yield from text_string_to_metric_families(text)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self):
        return self._families
