"""The real `loramux serve` on a tiny random base, with API keys for two tenants, driven by the stock `openai` client,
huggingface_hub's HfApi (pushing adapters through the server's own hub routes) and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from huggingface_hub import HfApi

from loadtests.tiny_model import make_tiny_checkpoint
from loramux.registry.registry import Registry
from tests.conftest import build_adapter
from tests.server.api.serving import launch, metric

GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import huggingface_hub.constants as hf_constants

    root = tmp_path_factory.mktemp("serve")
    base = make_tiny_checkpoint(root / "tiny", max_position_embeddings=2048)
    adapters = {
        "support": build_adapter(base, root / "support", r=4),
        "support2": build_adapter(base, root / "support2", r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        "legal": build_adapter(base, root / "legal", r=8),
        "huge": build_adapter(base, root / "huge", r=16),
    }
    registry = Registry.open(root / "data")
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    keys = {tenant: registry.create_key(tenant)[1] for tenant in ("acme", "globex")}
    server = launch(
        root / "home", "--base", str(base), "--data-dir", str(root / "data"),
        "--slots", "2", "--max-lora-rank", "8", "--max-num-seqs", "8",
        "--adapter-readers", "1",  # adapters read by a reader process, as on a GPU
        "--overlap-outputs",  # each step's outputs streamed during the next step, as on a GPU
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # the session runs offline; this hub is local
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        patch.setenv("HF_HUB_DISABLE_XET", "")  # recorded, so that the variable is removed again afterwards
        patch.delenv("HF_HUB_DISABLE_XET")
        patch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)  # pushes go through the hub's Xet routes
        patch.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hf-cache"))
        yield SimpleNamespace(url=server.url, server=server, keys=keys, adapters=adapters, base="tiny")
    assert server.stop() == 0, server.output()  # SIGTERM: a graceful shutdown
    assert "engine stopped" in server.output()


def client(env, tenant: str | None = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env.url}/v1", api_key=env.keys[tenant] if tenant else "none", max_retries=0)


def push(env, tenant: str, repo: str, adapter: str, private: bool = True) -> str:
    api = HfApi(endpoint=env.url, token=env.keys[tenant])
    api.create_repo(repo, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(env.adapters[adapter]), repo_id=repo).oid


def chat(env, model: str, tenant: str = "acme", **kwargs) -> str:
    answer = client(env, tenant).chat.completions.create(model=model, messages=HELLO, **{**GREEDY, **kwargs})
    return answer.choices[0].message.content


def test_base_chat_and_completions_streaming_or_not(env):
    llm = client(env)
    assert [m.id for m in llm.models.list().data] == ["tiny"]

    answer = llm.chat.completions.create(model="tiny", messages=HELLO, **GREEDY)
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 3
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12

    chunks = list(
        llm.chat.completions.create(
            model="tiny", messages=HELLO, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    text = llm.completions.create(model="tiny", prompt="Once upon", **GREEDY)
    assert text.object == "text_completion" and text.usage.completion_tokens == 12
    streamed = list(llm.completions.create(model="tiny", prompt="Once upon", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"

    # Two prompts in one completion request: one choice each, in order, the prompt tokens of both counted.
    both = llm.completions.create(model="tiny", prompt=["Once upon", "Hello there"], **GREEDY)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == text.choices[0].text


def test_n_choices_with_a_seed_are_reproducible(env):
    llm = client(env)
    sampled = {"model": "tiny", "messages": HELLO, "temperature": 1.0, "max_tokens": 8, "seed": 7}
    three = llm.chat.completions.create(n=3, **sampled)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) > 1  # different seeds per choice
    assert [c.message.content for c in llm.chat.completions.create(n=3, **sampled).choices] == texts
    # Choice i samples with seed + i.
    assert llm.chat.completions.create(**{**sampled, "seed": 9}).choices[0].message.content == texts[2]
    assert three.usage.completion_tokens == 3 * 8  # every choice counts; the prompt is counted once
    assert three.usage.prompt_tokens == llm.chat.completions.create(**sampled).usage.prompt_tokens


def test_tenants_push_adapters_served_at_once_and_private(env):
    base_answer = chat(env, "tiny")
    push(env, "acme", "acme/support", "support")
    push(env, "globex", "globex/legal", "legal")

    support = chat(env, "acme/support")  # no restart: pushed, then served
    assert support != base_answer
    assert chat(env, "globex/legal", tenant="globex") not in (base_answer, support)

    listed = {m.id for m in client(env, "acme").models.list().data}
    assert listed == {"tiny", "acme/support"}
    assert {m.id for m in client(env, "globex").models.list().data} == {"tiny", "globex/legal"}

    # Another tenant's private adapter answers exactly like one that does not exist.
    refusals = []
    for model in ("acme/support", "acme/nothing"):
        with pytest.raises(openai.NotFoundError) as refused:
            chat(env, model, tenant="globex")
        refusals.append(refused.value.body)
    assert refusals[0]["code"] == refusals[1]["code"] == "model_not_found"
    assert refusals[0]["message"].replace("acme/support", "X") == refusals[1]["message"].replace("acme/nothing", "X")
    with pytest.raises(openai.NotFoundError):
        chat(env, "globex/legal", tenant="acme")


def test_a_new_revision_replaces_the_old(env):
    first = push(env, "acme", "acme/versioned", "support")
    assert chat(env, "acme/versioned") == chat(env, f"acme/versioned@{first}")
    second = push(env, "acme", "acme/versioned", "support2")
    assert second != first
    newest = chat(env, "acme/versioned")
    assert newest == chat(env, f"acme/versioned@{second}")
    assert newest != chat(env, f"acme/versioned@{first}")


def test_concurrent_requests_for_different_adapters_match_one_at_a_time(env):
    push(env, "acme", "acme/support", "support")
    push(env, "globex", "globex/legal", "legal")
    jobs = [
        ("acme", "tiny", "Hello there"),
        ("acme", "acme/support", "Hello there"),
        ("globex", "globex/legal", "Hello there"),
        ("acme", "acme/support", "Tell me a story about a robot"),
        ("globex", "globex/legal", "Why is the sky blue?"),
        ("globex", "tiny", "Why is the sky blue?"),
    ]

    def run(job):
        tenant, model, text = job
        answer = client(env, tenant).chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], **{**GREEDY, "max_tokens": 16}
        )
        return answer.choices[0].message.content

    alone = [run(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert len(set(alone)) >= 4  # the adapters really changed the answers


def test_errors_are_openai_shaped_with_the_right_status(env):
    llm = client(env)
    with pytest.raises(openai.NotFoundError) as unknown:
        llm.chat.completions.create(model="no such model", messages=HELLO)
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"

    with pytest.raises(openai.BadRequestError) as too_long:
        llm.completions.create(model="tiny", prompt="x" * 3000, max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"

    for bad in ({"temperature": 3}, {"frequency_penalty": 3.0}, {"n": 0}, {"stop": ["a"] * 5}, {"top_p": 0}):
        with pytest.raises(openai.BadRequestError) as refused:
            llm.chat.completions.create(model="tiny", messages=HELLO, **bad)
        assert refused.value.body["type"] == "invalid_request_error", bad

    push(env, "acme", "acme/huge", "huge")  # rank 16 on a server that serves ranks up to 8
    with pytest.raises(openai.BadRequestError) as too_big:
        chat(env, "acme/huge")
    assert too_big.value.body["code"] == "adapter_incompatible" and "rank" in too_big.value.body["message"]

    for headers in ({}, {"Authorization": "Bearer lmx_wrong"}):
        response = httpx.post(
            f"{env.url}/v1/chat/completions", json={"model": "tiny", "messages": HELLO}, headers=headers
        )
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(
        f"{env.url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {env.keys['acme']}"}
    )
    assert response.status_code == 400 and "error" in response.json()


def test_metrics_present_and_moving(env):
    before = httpx.get(f"{env.url}/metrics").text
    push(env, "acme", "acme/support", "support")
    chat(env, "acme/support")
    with pytest.raises(openai.NotFoundError):
        chat(env, "acme/missing")
    after = httpx.get(f"{env.url}/metrics").text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loramux_requests_total", endpoint="chat", status="200") == 1
    assert delta("loramux_requests_total", endpoint="chat", status="404") == 1
    assert delta("loramux_generation_tokens_total", tenant="acme", adapter="acme/support") == 12
    assert delta("loramux_prompt_tokens_total", tenant="acme", adapter="acme/support") > 0
    assert delta("loramux_time_to_first_token_seconds_count", adapter="acme/support") == 1
    assert delta("loramux_time_per_output_token_seconds_count", adapter="acme/support") == 1
    assert delta("loramux_request_latency_seconds_count", endpoint="chat") == 2
    assert delta("loramux_adapter_cache_hits") + delta("loramux_adapter_cache_misses") >= 1
    # one chat of 12 tokens: its prompt in a step of its own (nothing else ran), then 11 decode steps
    assert delta("loramux_steps_prefill") == 1 and delta("loramux_steps_decode") == 11
    assert delta("loramux_step_prompt_tokens_prefill") == delta(
        "loramux_prompt_tokens_total", tenant="acme", adapter="acme/support"
    )
    for gauge in ("requests_waiting", "requests_running", "kv_blocks_total", "kv_blocks_used", "slots_total",
                  "slots_used", "adapter_loads", "adapter_load_seconds", "adapter_read_seconds",
                  "adapter_slot_write_seconds"):  # fmt: skip
        assert f"\nloramux_{gauge} " in after, gauge
    assert metric(after, "loramux_adapter_read_seconds") > 0  # the adapter was read from disk in this test
    assert metric(after, "loramux_slots_total") == 2
    assert metric(after, "loramux_adapter_reader_processes") == 1


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(env):
    before = httpx.get(f"{env.url}/metrics").text
    body = {"model": "tiny", "messages": HELLO, "stream": True, "max_tokens": 1900, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {env.keys['acme']}", "x-request-id": "disconnect-test-1"}
    with httpx.stream("POST", f"{env.url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.headers["x-request-id"] == "disconnect-test-1"
        events = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
            if len(events) == 4:
                break
    assert all(e["choices"][0]["finish_reason"] is None for e in events)

    def aborted(text: str) -> float:
        return metric(text, "loramux_requests_aborted_total", reason="disconnect")

    # The server notices, aborts the request and frees its KV blocks (wait for it, with a generous bound).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = httpx.get(f"{env.url}/metrics").text
        logged = '"request_id": "disconnect-test-1"' in env.server.output()
        if aborted(after) > aborted(before) and metric(after, "loramux_requests_running") == 0 and logged:
            break
        time.sleep(0.05)
    assert aborted(after) == aborted(before) + 1
    assert metric(after, "loramux_requests_running") == 0 and metric(after, "loramux_kv_blocks_used") == 0
    generated = metric(after, "loramux_generation_tokens_total", tenant="acme", adapter="base") - metric(
        before, "loramux_generation_tokens_total", tenant="acme", adapter="base"
    )
    assert 0 < generated < 1900
    assert '"request_id": "disconnect-test-1"' in env.server.output()
