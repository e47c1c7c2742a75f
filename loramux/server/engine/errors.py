"""The engine's typed errors. The HTTP layer maps them: invalid request/context length -> 400, unknown adapter ->
404 (`loramux.core.adapter_source.AdapterNotFoundError`), adapter that does not fit -> 400 (`AdapterConfigError`),
queue full -> 429, engine stopped or an adapter that could not be written into GPU slot memory -> 503."""

from __future__ import annotations

from loramux.core.adapter_config import AdapterConfigError


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given (bad sampling parameters, empty prompt, ...)."""


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit the model's context (or the whole KV cache)."""


class AdapterTooLargeError(AdapterConfigError):
    """The adapter's rank exceeds the engine's slot rank (`max_lora_rank`)."""


class QueueFullError(RuntimeError):
    """The engine holds as many requests as it accepts; retry later."""


class EngineStoppedError(RuntimeError):
    """The engine has been shut down (or its step loop failed)."""


class AdapterLoadError(RuntimeError):
    """An adapter read fine could not be written into slot memory (the device refused the copies: out of memory,
    say); the requests waiting for that slot end with it. Another request may succeed."""
