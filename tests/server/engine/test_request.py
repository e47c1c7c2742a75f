"""A request's view of its own sequence."""

from __future__ import annotations

from loramux.server.engine.request import Request, SamplingParams


def test_token_ids_are_the_slices_of_prompt_then_output():
    request = Request("r", [11, 12, 13, 14, 15], SamplingParams(), None, None, set())
    request.output_ids += [16, 17, 18]
    sequence = [11, 12, 13, 14, 15, 16, 17, 18]
    for start in range(len(sequence) + 1):
        for end in range(start, len(sequence) + 1):
            assert request.token_ids(start, end) == sequence[start:end], (start, end)
