"""The engine process's messages: errors keep their kind across the process boundary (the API's status depends on
it), sampling parameters and logprobs arrive as they left."""

from __future__ import annotations

from loramux.core.adapter_source import AdapterNotFoundError
from loramux.registry.store import StorageUnavailableError
from loramux.server.engine import protocol
from loramux.server.engine.errors import ContextLengthError, QueueFullError
from loramux.server.engine.request import SamplingParams, TokenLogprobs
from loramux.server.models.lora_weights import AdapterMismatchError


def through_the_wire(obj):
    return protocol.unpack(protocol.pack(obj))[0]


def test_errors_keep_their_kind_and_message():
    class LocalMismatch(AdapterMismatchError):  # a subclass the API does not know arrives as its known parent
        pass

    for sent, kind in (
        (AdapterNotFoundError("adapter t/x not found"), AdapterNotFoundError),
        (LocalMismatch("trained on another base"), AdapterMismatchError),
        (ContextLengthError("too long"), ContextLengthError),
        (QueueFullError("retry later"), QueueFullError),
    ):
        back = protocol.error_from_wire(through_the_wire(protocol.error_to_wire(sent)))
        assert type(back) is kind and str(back) == str(sent)
    down = protocol.error_from_wire(
        through_the_wire(protocol.error_to_wire(StorageUnavailableError("h:5432", "bucket")))
    )
    assert isinstance(down, StorageUnavailableError) and down.store == "bucket" and "h:5432" not in down.public_message
    other = protocol.error_from_wire(through_the_wire(protocol.error_to_wire(KeyError("k"))))
    assert type(other) is RuntimeError and "KeyError" in str(other)


def test_sampling_params_and_logprobs_arrive_as_they_left():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["x"], logit_bias={12: -5.0},
                            logprobs=2)  # fmt: skip
    assert protocol.params_from_wire(through_the_wire(protocol.params_to_wire(params))) == params
    logprobs = [TokenLogprobs(-0.5, [(4, -0.5), (9, -1.25)])]
    assert protocol.logprobs_from_wire(through_the_wire(protocol.logprobs_to_wire(logprobs))) == logprobs
    assert protocol.logprobs_from_wire(through_the_wire(protocol.logprobs_to_wire(None))) is None
