"""How engine errors become the API's answers (`api_error_for`)."""

from __future__ import annotations

import json

from loramux.server.api.generation import api_error_for
from loramux.server.engine.errors import AdapterLoadError


def test_an_adapter_the_device_could_not_take_is_a_503_to_retry():
    error = api_error_for(AdapterLoadError("adapter t/b@1 could not be written into slot memory: out of memory"),
                          "t/b", "messages")  # fmt: skip
    response = error.response()
    body = json.loads(response.body)["error"]
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert body["code"] == "adapter_load_failed" and body["type"] == "server_error" and body["param"] == "model"
    assert "'t/b'" in body["message"] and "out of memory" in body["message"]
