"""What the load generator sends: length distributions, Zipf adapter popularity, tenants, word prompts, arrivals.

Everything here is driven by seeded `random.Random` streams, so one seed gives the same sequence of requests
whatever the server's speed: request i always has the same tenant, adapter, prompt and `max_tokens`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

# Common English words: prompts made of them tokenize to roughly 1.2-1.5 tokens per word with BPE tokenizers.
WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "over new sound take only little work know place year live me back give most very after thing our just name "
    "good sentence man think say great where help through much before line right too mean old any same tell boy "
    "follow came want show also around form three small set put end does another well large must big even such "
    "because turn here why ask went men read need land different home us move try kind hand picture again change "
    "off play spell air away animal house point page letter mother answer found study still learn should world"
).split()


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths: `fixed:N` (or `N`), `uniform:LO,HI` (inclusive) or
    `lognormal:MEDIAN,SIGMA[,MAX]` (the natural log of the length is normal; clipped to [1, MAX])."""

    kind: str
    a: float
    b: float = 0.0
    cap: int | None = None

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        kind, _, params = text.strip().partition(":")
        if not params and kind.isdigit():
            kind, params = "fixed", kind
        try:
            values = [float(v) for v in params.split(",")] if params else []
        except ValueError:
            raise ValueError(f"length distribution {text!r}: parameters must be numbers") from None
        if kind == "fixed" and len(values) == 1 and values[0] >= 1 and values[0].is_integer():
            return cls("fixed", values[0])
        integers = all(v.is_integer() for v in values)
        if kind == "uniform" and len(values) == 2 and 1 <= values[0] <= values[1] and integers:
            return cls("uniform", values[0], values[1])
        if kind == "lognormal" and len(values) in (2, 3) and values[0] >= 1 and values[1] >= 0:
            cap = int(values[2]) if len(values) == 3 else None
            if cap is not None and cap < values[0]:
                raise ValueError(f"length distribution {text!r}: MAX must be at least MEDIAN")
            return cls("lognormal", values[0], values[1], cap)
        raise ValueError(
            f"length distribution {text!r}: expected N, fixed:N, uniform:LO,HI (integers, 1 <= LO <= HI) "
            "or lognormal:MEDIAN,SIGMA[,MAX] (MEDIAN >= 1, SIGMA >= 0)"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        length = max(1, round(rng.lognormvariate(math.log(self.a), self.b)))
        return min(length, self.cap) if self.cap is not None else length

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)},{int(self.b)}"
        return f"lognormal:{self.a:g},{self.b:g}" + (f",{self.cap}" if self.cap is not None else "")


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Popularity of n items ranked 1..n under Zipf's law: P(rank k) ∝ 1 / k**exponent (0 means uniform)."""
    if n < 1:
        raise ValueError("need at least one item")
    if exponent < 0:
        raise ValueError(f"Zipf exponent must be >= 0, got {exponent}")
    raw = [1.0 / (k**exponent) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class Tenant:
    """A caller: a display name (what reports show; the key itself is never written out) and its API key."""

    name: str
    api_key: str | None

    @classmethod
    def parse(cls, text: str, index: int) -> Tenant:
        """`NAME=KEY` or a bare `KEY` (named tenant-INDEX)."""
        name, sep, key = text.partition("=")
        if not sep:
            name, key = f"tenant-{index}", text
        if not name or not key:
            raise ValueError(f"--api-key {text!r}: expected KEY or NAME=KEY")
        return cls(name, key)


@dataclass(frozen=True)
class RequestPlan:
    """One request to send: who sends it, which adapter, the prompt (in words), the output budget and the sampling
    fields of its body (none: the server's defaults)."""

    index: int
    tenant: Tenant
    model: str
    prompt: str
    prompt_words: int
    max_tokens: int
    sampling: dict = field(default_factory=dict)


# Sampling settings as users send them: (share of requests, body fields). `mix` is a blend like real traffic: most
# requests leave the temperature at the server's default, many cut the tail with top_p, some ask for greedy answers
# and some for reproducible ones (a seed).
SAMPLING = {
    "default": [(1.0, {})],
    "greedy": [(1.0, {"temperature": 0})],
    "mix": [(0.45, {}), (0.25, {"top_p": 0.9}), (0.2, {"temperature": 0}), (0.1, {"seed": None})],
}


@dataclass
class Workload:
    """The request mix. `plans()` yields request 0, 1, 2, ... deterministically from `seed`."""

    models: list[str]
    tenants: list[Tenant]
    prompt_words: LengthDist
    max_tokens: LengthDist
    zipf_exponent: float = 1.0
    tenant_weights: list[float] | None = None
    seed: int = 0
    sampling: str = "default"  # a key of SAMPLING

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling {self.sampling!r}: choose from {', '.join(SAMPLING)}")
        if not self.models:
            raise ValueError("need at least one model (adapter) to send requests to")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models must be distinct")
        if not self.tenants:
            raise ValueError("need at least one tenant")
        if len({t.name for t in self.tenants}) != len(self.tenants):
            raise ValueError("tenant names must be distinct")
        if self.tenant_weights is not None and (
            len(self.tenant_weights) != len(self.tenants)
            or any(w < 0 for w in self.tenant_weights)
            or sum(self.tenant_weights) <= 0
        ):
            raise ValueError("tenant weights: one non-negative weight per tenant, not all zero")
        # The first model listed is the most popular.
        self.model_probabilities = zipf_weights(len(self.models), self.zipf_exponent)

    def plans(self) -> Iterator[RequestPlan]:
        rng = random.Random(self.seed)
        sampling_rng = random.Random(self.seed + 2)  # its own stream: the rest of the mix does not depend on it
        kinds = SAMPLING[self.sampling]
        tenant_weights = self.tenant_weights or [1.0] * len(self.tenants)
        index = 0
        while True:
            tenant = rng.choices(self.tenants, weights=tenant_weights)[0]
            model = rng.choices(self.models, weights=self.model_probabilities)[0]
            words = self.prompt_words.sample(rng)
            prompt = " ".join(rng.choice(WORDS) for _ in range(words))
            fields = dict(sampling_rng.choices([f for _, f in kinds], weights=[w for w, _ in kinds])[0])
            if "seed" in fields:
                fields["seed"] = sampling_rng.randrange(2**31)
            yield RequestPlan(index, tenant, model, prompt, words, self.max_tokens.sample(rng), fields)
            index += 1


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Send times (seconds from the start) of an open-loop Poisson process: exponential gaps of mean 1/rate."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed + 1)  # its own stream: the request mix does not depend on the arrival mode
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t
