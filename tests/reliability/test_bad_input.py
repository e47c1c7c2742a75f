"""Bad input against the running server: broken adapters refused at push (over HTTP, through the stock HfApi) with
a 4xx that names the problem and no revision left behind; malformed, oversized and path-escaping requests refused
with OpenAI- or Hub-shaped 4xx answers."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from huggingface_hub.errors import HfHubHTTPError
from safetensors.numpy import load_file, save_file

from loramux.server.api.limits import MAX_BODY_BYTES
from tests.reliability.conftest import TINY_DIMS, push, write_adapter

WEIGHTS = "adapter_model.safetensors"


def edit_tensors(directory: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def nan_weights(d: Path) -> None:
    edit_tensors(d, lambda t: t[next(k for k in sorted(t) if "lora_A" in k)].__setitem__((0, 0), np.nan))


def rank_mismatch(d: Path) -> None:
    edit_config(d, r=8, lora_alpha=16)  # the tensors have rank 4


def base_mismatch(d: Path) -> None:
    write_adapter(d, dims={k: (out + 16, inp + 16) for k, (out, inp) in TINY_DIMS.items()})


def layer_beyond_base(d: Path) -> None:
    write_adapter(d, layers=5)


def rank_over_limit(d: Path) -> None:
    write_adapter(d, r=300)


def pickle_file(d: Path) -> None:
    (d / WEIGHTS).rename(d / "adapter_model.bin")


def truncated(d: Path) -> None:
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-100])


def huge_header(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


def unknown_target(d: Path) -> None:
    def rename(tensors: dict[str, np.ndarray]) -> None:
        for key in [k for k in tensors if "v_proj" in k]:
            tensors[key.replace("v_proj", "foo_proj")] = tensors.pop(key)

    edit_tensors(d, rename)
    edit_config(d, target_modules=["q_proj", "foo_proj"])


def config_not_json(d: Path) -> None:
    (d / "adapter_config.json").write_text("r: 4\nlora_alpha: 8\n")


CORPUS = {
    "nan": (nan_weights, "NaN or infinite"),
    "rank_mismatch": (rank_mismatch, "do not match rank 8"),
    "base_mismatch": (base_mismatch, "does not fit the base layer (64 -> 64 features)"),
    "layer_beyond_base": (layer_beyond_base, "the base model has only 2 layers"),
    "rank_over_limit": (rank_over_limit, "r must be an integer from 1 to 256, got 300"),
    "pickle": (pickle_file, "adapter_model.bin is a pickle file"),
    "truncated": (truncated, "truncated"),
    "huge_header": (huge_header, "its header claims 1099511627776 bytes"),
    "unknown_target": (unknown_target, "foo_proj is not a decoder linear layer"),
    "config_not_json": (config_not_json, "adapter_config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_a_broken_adapter_is_refused_at_push_naming_the_problem(tiny_server, tmp_path, case):
    breaks, problem = CORPUS[case]
    directory = write_adapter(tmp_path / case)
    breaks(directory)
    repo = f"local/broken-{case.replace('_', '-')}"
    with pytest.raises(HfHubHTTPError) as refused:
        push(tiny_server.api, directory, repo)
    assert refused.value.response.status_code in (400, 422), refused.value.response.text
    assert problem in refused.value.response.json()["error"]
    assert tiny_server.api.model_info(repo).sha is None  # no revision, not even a partial one
    # A chat naming the repo finds nothing to serve.
    answer = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=chat_body(repo), timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"


def test_a_good_adapter_still_pushes_and_serves(tiny_server, tmp_path):
    commit = push(tiny_server.api, write_adapter(tmp_path / "good"), "local/good")
    answer = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=chat_body("local/good"), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    assert tiny_server.api.model_info("local/good").sha == commit


def chat_body(model: str = "tiny", **changes) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}
    return {**body, **changes}


MALFORMED = {
    "not_json": (b'{"model": "tiny", "messages": [', None),
    "json_not_an_object": (b"[1, 2, 3]", None),
    "missing_messages": (json.dumps({"model": "tiny"}).encode(), "messages"),
    "missing_model": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "model"),
    "max_tokens_a_string": (json.dumps(chat_body(max_tokens="many")).encode(), "max_tokens"),
    "temperature_out_of_range": (json.dumps(chat_body(temperature=7)).encode(), "temperature"),
    "messages_not_a_list": (json.dumps(chat_body(messages="hi")).encode(), "messages"),
    "unknown_role": (json.dumps(chat_body(messages=[{"role": "wizard", "content": "hi"}])).encode(), "messages.0.role"),
    "unknown_field": (json.dumps(chat_body(tools=[])).encode(), "tools"),
    "n_too_large": (json.dumps(chat_body(n=1000)).encode(), "n"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_chat_requests_get_an_openai_shaped_400(tiny_server, case):
    body, param = MALFORMED[case]
    answer = httpx.post(
        f"{tiny_server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


def test_malformed_completion_prompt_types_get_a_400(tiny_server):
    for prompt in ([], [[1, 2], "mixed"], {"text": "hi"}, None, [-5.5]):
        answer = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": prompt})
        assert answer.status_code == 400, (prompt, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"


def test_oversized_bodies_get_a_413_and_the_server_carries_on(tiny_server):
    huge = chat_body(messages=[{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}])
    announced = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=huge, timeout=60)
    assert announced.status_code == 413
    assert announced.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds for a chunked body too
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"y" * (1 << 20)
        yield b'"}'

    chunked = httpx.post(
        f"{tiny_server.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{tiny_server.url}/v1/chat/completions", json=chat_body(), timeout=60).status_code == 200


@pytest.mark.parametrize(
    "model", ["../../etc/passwd", "local/../local/good", "local/..", "../registry.sqlite3", "local/good@../../x"]
)
def test_model_names_with_dot_dot_are_unknown_models(tiny_server, model):
    answer = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=chat_body(model), timeout=30)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "model_not_found"


def test_hub_names_and_paths_with_dot_dot_are_refused(tiny_server, tmp_path):
    url = tiny_server.url
    created = httpx.post(f"{url}/api/repos/create", json={"name": "..", "organization": "local"})
    assert created.status_code == 400 and "name" in created.json()["error"]
    created = httpx.post(f"{url}/api/repos/create", json={"name": "x", "organization": ".."})
    assert created.status_code == 400
    push(tiny_server.api, write_adapter(tmp_path / "escape"), "local/escape")
    # Percent-encoded, so that no client or proxy folds the dots away before the server sees them.
    for path in ("..%2f..%2fregistry.sqlite3", "%2e%2e/%2e%2e/registry.sqlite3", "sub/%2e%2e/%2e%2e/x"):
        answer = httpx.get(f"{url}/local/escape/resolve/main/{path}")
        assert answer.status_code in (400, 404), (path, answer.status_code)
        assert b"SQLite" not in answer.content
    answer = httpx.get(f"{url}/%2e%2e/escape/resolve/main/adapter_config.json")
    assert answer.status_code in (400, 404)
