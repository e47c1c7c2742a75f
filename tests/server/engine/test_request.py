"""A request's view of its own sequence."""

from __future__ import annotations

import pytest

from loramux.server.engine.errors import InvalidRequestError
from loramux.server.engine.request import Request, SamplingParams


def test_token_ids_are_the_slices_of_prompt_then_output():
    request = Request("r", [11, 12, 13, 14, 15], SamplingParams(), None, None, set())
    request.output_ids += [16, 17, 18]
    sequence = [11, 12, 13, 14, 15, 16, 17, 18]
    for start in range(len(sequence) + 1):
        for end in range(start, len(sequence) + 1):
            assert request.token_ids(start, end) == sequence[start:end], (start, end)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_p", 1.5, "min_p must be between 0 and 1"),
        ("presence_penalty", -2.5, "presence_penalty must be between -2 and 2"),
        ("frequency_penalty", 2.01, "frequency_penalty must be between -2 and 2"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in"),
        ("logit_bias", {5: 101.0}, "logit_bias"),
        ("logit_bias", {-1: 1.0}, "logit_bias"),
        ("logit_bias", {"5": 1.0}, "logit_bias"),
        ("logprobs", 21, "logprobs must be an integer between 0 and 20"),
        ("logprobs", True, "logprobs"),
        ("temperature", float("nan"), "temperature"),
        ("seed", 2**64, "seed must be an integer between"),
    ],
)
def test_sampling_params_refuse_values_out_of_range(field, value, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**{field: value})


def test_sampling_params_accept_the_edges_of_their_ranges():
    SamplingParams(min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=100.0)
    SamplingParams(logit_bias={0: -100, 7: 100.0}, logprobs=0)
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5).greedy
