"""A request's state on its way through the engine, its sampling parameters, and what comes back: the engine's
token ids per step (`EngineOutput`), which the API side turns into text (`RequestOutput`, `outputs.py`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from loramux.core.adapter_source import AdapterRef
from loramux.server.engine.errors import InvalidRequestError
from loramux.server.models.lora_weights import LoraWeights

_arrivals = itertools.count()


MAX_LOGPROBS = 20  # the most top logprobs a request may ask for per token (OpenAI's limit)


@dataclass
class SamplingParams:
    """Per-request sampling (`layers/sampler.py` says how they combine). temperature 0 is greedy; top_k <= 0,
    top_p == 1, min_p == 0, the penalties at 0 (1 for repetition_penalty) are off; same seed, same output."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # keep the tokens whose probability is at least min_p times the most likely one's
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted from a token's logit once per time it was generated
    repetition_penalty: float = 1.0  # vLLM's and transformers': divides (or multiplies) the logits of tokens seen
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    logprobs: int | None = None  # None: none; 0: the chosen token's logprob; k: also the k most likely tokens'
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
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be an integer between -2**63 and 2**64 - 1, got {self.seed!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be between 0 and 1, got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if not isinstance(self.logit_bias, dict) or any(
            not isinstance(t, int) or t < 0 or not isinstance(b, int | float) or not -100.0 <= b <= 100.0
            for t, b in self.logit_bias.items()
        ):
            raise InvalidRequestError("logit_bias must map token ids (non-negative integers) to values in [-100, 100]")
        lp = self.logprobs
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer between 0 and {MAX_LOGPROBS}, got {lp!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(slots=True)
class TokenLogprobs:
    """A sampled token's log probability under the model, and the `SamplingParams.logprobs` most likely tokens'."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class EngineOutput:
    """What one step did for one request, as the engine reports it: token ids, never text."""

    request_id: str
    token_ids: list[int]  # sampled this step (the final stop token included); empty for an error or an abort
    finish_reason: str | None = None  # "stop" (a stop token), "length" or "abort"; None while it runs
    error: BaseException | None = None  # the request ended with this error instead (no tokens were sampled)
    logits: torch.Tensor | None = None  # (len(token_ids), vocab) fp32, only with SamplingParams.capture_logits
    logprobs: list[TokenLogprobs] | None = None  # one per token id, where SamplingParams.logprobs asked

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
    logprobs: list[TokenLogprobs] | None = None  # one per token id in token_ids, where SamplingParams.logprobs asked

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
        # A seeded request's own random numbers, on the host (the sampler makes it at its first step), so that batch
        # mates never change what it samples; unseeded requests share the device's generator.
        self.generator: torch.Generator | None = None

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
