"""A request's state on its way through the engine, its sampling parameters, and what comes back: the engine's
token ids per step (`EngineOutput`), which the API side turns into text (`RequestOutput`, `outputs.py`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from loramux.adapters.source import AdapterRef
from loramux.adapters.weights import LoraWeights
from loramux.server.engine.errors import InvalidRequestError

_arrivals = itertools.count()


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k <= 0 and top_p == 1 are off; same seed, same output."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the base's end-of-sequence tokens
    ignore_eos: bool = False  # keep going past the base's end-of-sequence tokens
    capture_logits: bool = False  # attach each sampled token's logits row to the outputs (parity tests, debugging)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int):
            raise InvalidRequestError(f"top_k must be an integer, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class EngineOutput:
    """What one step did for one request, as the engine reports it: token ids, never text."""

    request_id: str
    token_ids: list[int]  # sampled this step (the final stop token included); empty for an error or an abort
    finish_reason: str | None = None  # "stop" (a stop token), "length" or "abort"; None while it runs
    error: BaseException | None = None  # the request ended with this error instead (no tokens were sampled)
    logits: torch.Tensor | None = None  # (len(token_ids), vocab) fp32, only with SamplingParams.capture_logits

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class RequestOutput:
    """One item of a request's stream: what is new since the last item, and the running counts."""

    request_id: str
    text: str  # text delta (stop strings and end-of-sequence tokens never appear in it)
    token_ids: list[int]  # token ids sampled since the last item (including a final stop token)
    finish_reason: str | None  # None while running; "stop", "length" or "abort" on the last item
    prompt_tokens: int
    completion_tokens: int
    logits: torch.Tensor | None = None  # (len(token_ids), vocab) fp32, only with SamplingParams.capture_logits

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestStatus(Enum):
    RESOLVING = "resolving"  # its adapter is being resolved and read into the CPU cache
    WAITING = "waiting"  # queued for a slot, KV blocks and a place in the batch
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None,
        tenant: str | None,
        stop_ids: set[int],
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.adapter = adapter
        self.tenant = tenant or ""
        self.arrival = next(_arrivals)
        self.stop_ids = stop_ids
        self.status = RequestStatus.RESOLVING if adapter is not None else RequestStatus.WAITING

        self.adapter_key: str | None = None  # repo@commit once resolved
        self.lora: LoraWeights | None = None  # its weights in the CPU cache, until they are in a slot
        self.slot = -1  # adapter slot it holds a pin on; -1 = none (base, or not assigned yet)
        self.output_ids: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.generator = torch.Generator()  # its own, so batch mates never change what it samples
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()  # a fresh random seed, without touching torch's global generator

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start .. end - 1 of the sequence (prompt, then output), without building the whole sequence: a
        step takes one token of each decoding request, and the sequence may be thousands long."""
        prompt = len(self.prompt_ids)
        if start >= prompt:
            return self.output_ids[start - prompt : end - prompt]
        if end <= prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def needs_slot(self) -> bool:
        return self.adapter is not None and self.slot < 0

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, {self.status.value}, adapter={self.adapter_key}, slot={self.slot})"
