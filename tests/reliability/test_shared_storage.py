"""`loramux serve` and a `loramux hub` on one shared registry (PostgreSQL + S3), as a deployment runs them: a push
through the hub is served at the next request; the bucket or the database going away gives clear 503s (OpenAI's
shape on the API, the Hub's on hub routes), and once it is back everything is as it was, with nothing half-made."""

from __future__ import annotations

import io

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from loadtests.tiny_model import make_tiny_checkpoint
from tests.registry.test_shared_registry import launch_hub
from tests.reliability.conftest import TINY_MAX_RANK, push, write_adapter
from tests.server.api.serving import launch

LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def answer(url: str, model: str) -> str:
    response = chat(url, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def upload(url: str) -> httpx.Response:
    files = {"file": ("train.jsonl", io.BytesIO(LINE * 2), "application/jsonl")}
    return httpx.post(f"{url}/v1/files", data={"purpose": "fine-tune"}, files=files, timeout=60)


def assert_openai_503(response: httpx.Response, store: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "storage_unavailable")
    assert error["message"] == f"The registry's {store} is unavailable; nothing was changed, retry later."
    assert "127.0.0.1" not in response.text  # where the storage lives stays in the server's log


def assert_hub_503(response: httpx.Response, store: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"] == f"The registry's {store} is unavailable; nothing was changed, retry later."
    assert response.headers["x-error-message"].startswith(f"The registry's {store}")


@pytest.fixture
def serve_and_hub(shared_storage, tmp_path, hub_client_env):
    """A tiny `loramux serve` and a `loramux hub`, each with its own local data directory, on one shared registry."""
    base = make_tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=256)
    server = launch(
        tmp_path / "serve", "--base", str(base), "--data-dir", str(tmp_path / "serve" / "data"), "--slots", "2",
        "--max-lora-rank", str(TINY_MAX_RANK), "--max-num-seqs", "4", "--max-model-len", "128",
        env=shared_storage.env,
    )  # fmt: skip
    hub = launch_hub(tmp_path / "hub", shared_storage)
    yield server, hub
    for process in (server, hub):
        assert process.stop() == 0, process.output()


def test_a_push_through_the_hub_is_served_at_once_and_an_unreachable_bucket_is_a_clean_503(
    serve_and_hub, s3_server, tmp_path
):
    server, hub = serve_and_hub
    api = HfApi(endpoint=hub.url)
    first = push(api, write_adapter(tmp_path / "v1", seed=1, scale=0.5), "me/shared")
    before = answer(server.url, "me/shared")
    second = push(api, write_adapter(tmp_path / "v2", seed=2, scale=0.5), "me/shared")
    after = answer(server.url, "me/shared")  # the next request after the push, on another process
    assert after == answer(server.url, f"me/shared@{second}") != answer(server.url, f"me/shared@{first}") == before
    other = push(api, write_adapter(tmp_path / "other", seed=3, scale=0.5), "me/other")  # not read by serve yet

    s3_server.stop()
    try:
        assert_openai_503(chat(server.url, "me/other"), "bucket")  # its files are in the bucket only
        assert_openai_503(upload(server.url), "bucket")
        assert answer(server.url, "me/shared") == after  # what serve holds already is still served
        assert_hub_503(httpx.get(f"{server.url}/me/other/resolve/main/adapter_model.safetensors", timeout=60), "bucket")
        with pytest.raises(HfHubHTTPError) as refused:
            push(api, write_adapter(tmp_path / "v3", seed=4, scale=0.5), "me/shared")
        assert refused.value.response.status_code == 503
    finally:
        s3_server.start()

    assert [c.commit_id for c in api.list_repo_commits("me/shared")] == [second, first]  # nothing half-made
    assert answer(server.url, "me/other") == answer(server.url, f"me/other@{other}")
    assert upload(server.url).status_code == 200
    third = push(api, write_adapter(tmp_path / "v3", seed=4, scale=0.5), "me/shared")
    assert answer(server.url, "me/shared") == answer(server.url, f"me/shared@{third}") != after


def test_the_database_going_away_is_a_clean_503_and_both_processes_recover(serve_and_hub, postgres_cluster, tmp_path):
    server, hub = serve_and_hub
    api = HfApi(endpoint=hub.url)
    first = push(api, write_adapter(tmp_path / "v1", seed=1, scale=0.5), "me/shared")
    served = answer(server.url, "me/shared")

    postgres_cluster.stop()
    try:
        assert_openai_503(chat(server.url, "me/shared"), "database")
        assert_openai_503(httpx.get(f"{server.url}/v1/models", timeout=60), "database")
        assert_hub_503(httpx.get(f"{hub.url}/api/models/me/shared", timeout=60), "database")
        assert_hub_503(httpx.get(f"{server.url}/api/models/me/shared", timeout=60), "database")
    finally:
        postgres_cluster.start()

    # Back: the same processes serve again (their pools replace the broken connections); nothing was lost.
    assert answer(server.url, "me/shared") == served
    second = push(api, write_adapter(tmp_path / "v2", seed=2, scale=0.5), "me/shared")
    assert [c.commit_id for c in api.list_repo_commits("me/shared")] == [second, first]
    assert answer(server.url, "me/shared") == answer(server.url, f"me/shared@{second}")
