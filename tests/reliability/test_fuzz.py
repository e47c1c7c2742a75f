"""The server's OpenAPI schema fuzzed with schemathesis against the running tiny server: whatever the body, path or
query, no answer is a 5xx. A bounded number of examples per operation keeps it under a minute."""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 10  # per operation (about 30 of them) and mode (valid input, and input that breaks the schema)


def test_no_operation_answers_a_server_error(tiny_server):
    schema = schemathesis.openapi.from_url(f"{tiny_server.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result, mode in itertools.product(schema.get_all_operations(), GenerationMode):
        operation = result.ok()
        operations += mode is GenerationMode.POSITIVE

        # derandomize: the same examples every run, so that a failure here reproduces.
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            response = case.call(timeout=60)
            if response.status_code >= 500:
                sent = case.as_curl_command()
                failures.append(f"{case.operation.label}: {response.status_code} {response.text[:200]} <- {sent}")

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without parameters has no invalid input
    assert operations >= 20  # the inference, hub and health routes were all there to fuzz
    assert not failures, "\n".join(failures)
    assert tiny_server.server.process.poll() is None
