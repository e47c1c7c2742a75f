"""The messages between API processes and the engine process: one msgpack frame each, over a ZeroMQ ROUTER socket
that the engine binds and a DEALER socket per API process.

API -> engine: `[HELLO]`, `[ADD, request_id, prompt_ids, params, adapter, tenant]`, `[ABORT, [request_id, ...]]`,
`[STATS, token]`, `[SHUTDOWN]`.
Engine -> API: `[OUTPUTS, [[request_id, token_ids, finish_reason, error, logprobs], ...]]` once a step for all of
that API process's requests that moved (`error` is `[kind, message, store]` or None; `logprobs` None or one
`[logprob, [[token_id, logprob], ...]]` per token), `[STATS, token, {name: number}]`,
`[DEAD, message]` when the step loop failed and the engine process exits.
"""

from __future__ import annotations

import dataclasses

import msgpack

from loramux.core.adapter_config import AdapterConfigError
from loramux.core.adapter_source import AdapterNotFoundError
from loramux.core.validate import AdapterValidationError
from loramux.registry.blobs import BlobError, CorruptBlobError
from loramux.registry.store import StorageUnavailableError
from loramux.server.engine.errors import (
    AdapterLoadError,
    AdapterTooLargeError,
    ContextLengthError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
)
from loramux.server.engine.request import SamplingParams, TokenLogprobs
from loramux.server.models.lora_weights import AdapterMismatchError

HELLO, ADD, ABORT, STATS, SHUTDOWN, OUTPUTS, DEAD = "hello", "add", "abort", "stats", "shutdown", "out", "dead"

# The errors that cross the process boundary as themselves (the API maps each to its status); any other arrives as
# a RuntimeError naming its type.
_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        AdapterNotFoundError,
        AdapterConfigError,
        AdapterValidationError,
        AdapterMismatchError,
        AdapterTooLargeError,
        AdapterLoadError,
        BlobError,
        CorruptBlobError,
        ContextLengthError,
        InvalidRequestError,
        QueueFullError,
        EngineStoppedError,
        StorageUnavailableError,
    )
}


def pack(*parts) -> bytes:
    return msgpack.packb(parts, use_bin_type=True)


def unpack(frame: bytes) -> list:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def params_to_wire(params: SamplingParams) -> dict:
    return dataclasses.asdict(params)


def params_from_wire(fields: dict) -> SamplingParams:
    return SamplingParams(**fields)


def error_to_wire(exc: BaseException) -> list[str]:
    """[kind, message, store]: the nearest class in `exc`'s ancestry that the API knows (`store`: what part of the
    registry's storage a StorageUnavailableError names)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _ERRORS:
            return [cls.__name__, str(exc), getattr(exc, "store", "")]
    return ["RuntimeError", f"{type(exc).__name__}: {exc}", ""]


def error_from_wire(wire: list[str]) -> BaseException:
    kind, message, store = wire
    if kind == StorageUnavailableError.__name__:
        return StorageUnavailableError(message, store)
    return _ERRORS.get(kind, RuntimeError)(message)


def logprobs_to_wire(logprobs: list[TokenLogprobs] | None) -> list | None:
    return None if logprobs is None else [[t.logprob, t.top] for t in logprobs]


def logprobs_from_wire(wire: list | None) -> list[TokenLogprobs] | None:
    return None if wire is None else [TokenLogprobs(lp, [(int(i), v) for i, v in top]) for lp, top in wire]
