"""The fine-tuning API on the real `loramux serve` (tiny random base, two tenants), driven by the `openai` client and
httpx, with real `loramux train-worker` processes: uploads checked line by line, jobs validated, listed, isolated per
tenant and cancelled (queued or running); a worker killed with SIGKILL mid-job is replaced by another that resumes
from the checkpoint, while the server keeps answering; the result is served at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from loadtests.tiny_model import make_tiny_checkpoint
from loramux.registry.registry import Registry
from tests.conftest import REPO
from tests.server.api.serving import launch

PAIRS = [(f"question {i}?", f"answer number {i}.") for i in range(12)]


def jsonl(pairs: list[tuple[str, str]]) -> bytes:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def start_worker(data_dir: Path, home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LORAMUX_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (home / f"worker-{time.monotonic_ns()}.log").open("wb")
    command = [sys.executable, "-m", "loramux.cli", "train-worker", "--data-dir", str(data_dir), *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(worker: subprocess.Popen) -> int:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return worker.returncode


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def all_events(llm: openai.OpenAI, job_id: str) -> list:
    """Every event of the job, oldest first (the API pages them newest first)."""
    return list(reversed(list(llm.fine_tuning.jobs.list_events(job_id, limit=100))))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = make_tiny_checkpoint(root / "tiny", max_position_embeddings=512)
    data = root / "data"
    registry = Registry.open(data)
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    keys = {tenant: registry.create_key(tenant)[1] for tenant in ("acme", "globex")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAMUX_MAX_UPLOAD_BYTES", str(64 * 1024))
        server = launch(root / "home", "--base", str(base), "--data-dir", str(data), "--max-lora-rank", "16")
    yield SimpleNamespace(url=server.url, server=server, keys=keys, data=data, home=root / "home")
    assert server.stop() == 0, server.output()


def client(env, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env.url}/v1", api_key=env.keys[tenant], max_retries=0)


def upload(env, content: bytes, tenant: str = "acme", name: str = "train.jsonl", purpose: str = "fine-tune"):
    return httpx.post(
        f"{env.url}/v1/files",
        headers={"Authorization": f"Bearer {env.keys[tenant]}"},
        files={"file": (name, content)},
        data={"purpose": purpose},
        timeout=30,
    )


def test_uploads_are_validated_line_by_line_and_private_to_their_tenant(env):
    llm = client(env)
    good = llm.files.create(file=("train.jsonl", jsonl(PAIRS)), purpose="fine-tune")
    assert good.id.startswith("file-") and good.bytes == len(jsonl(PAIRS)) and good.filename == "train.jsonl"
    assert llm.files.retrieve(good.id).purpose == "fine-tune"
    assert good.id in [f.id for f in llm.files.list()]

    lines = jsonl(PAIRS[:2]) + b'{"messages": [{"role": "user", "content": "no answer"}]}\n' + jsonl(PAIRS[2:3])
    bad = upload(env, lines)
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["code"] == "invalid_file_format" and error["param"] == "file"
    assert "train.jsonl line 3" in error["message"] and "assistant" in error["message"]
    assert "line 2: not valid JSON" in upload(env, jsonl(PAIRS[:1]) + b"{broken\n").json()["error"]["message"]
    assert upload(env, jsonl(PAIRS), purpose="assistants").json()["error"]["param"] == "purpose"
    too_big = upload(env, jsonl(PAIRS) * 200)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]

    other = client(env, "globex")
    assert good.id not in [f.id for f in other.files.list()]
    for call in (lambda: other.files.retrieve(good.id), lambda: other.files.delete(good.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    extra = llm.files.create(file=("extra.jsonl", jsonl(PAIRS[:3])), purpose="fine-tune")
    assert llm.files.delete(extra.id).deleted
    with pytest.raises(openai.NotFoundError):
        llm.files.retrieve(extra.id)


def test_jobs_are_validated_queued_listed_and_isolated_per_tenant(env):
    llm, other = client(env), client(env, "globex")
    file_id = llm.files.create(file=("train.jsonl", jsonl(PAIRS)), purpose="fine-tune").id
    theirs = other.files.create(file=("train.jsonl", jsonl(PAIRS)), purpose="fine-tune").id

    refused = {
        "model": ({"model": "gpt-4o-mini", "training_file": file_id}, "gpt-4o-mini"),
        "file": ({"model": "tiny", "training_file": theirs}, "training_file"),
        "unknown": ({"model": "tiny", "training_file": file_id, "hyperparameters": {"epochs": 2}}, "epochs"),
        "rank": ({"model": "tiny", "training_file": file_id, "lora": {"rank": 32}}, "lora_rank"),
        "range": ({"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 0}}, "n_epochs"),
        "suffix": ({"model": "tiny", "training_file": file_id, "suffix": "../up"}, "suffix"),
    }
    for name, (body, mentioned) in refused.items():
        response = httpx.post(
            f"{env.url}/v1/fine_tuning/jobs", json=body, headers={"Authorization": f"Bearer {env.keys['acme']}"}
        )
        assert response.status_code == 400, (name, response.text)
        assert mentioned in response.json()["error"]["message"], name

    job = llm.fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        suffix="support",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 25},
        extra_body={"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job" and job.status == "queued"
    assert job.model == "tiny" and job.training_file == file_id and job.fine_tuned_model is None and job.seed == 7
    shown = job.hyperparameters.model_dump()
    assert shown["n_epochs"] == 2 and shown["batch_size"] == 4 and shown["learning_rate_multiplier"] == 25
    assert job.to_dict()["hyperparameters"]["lora_rank"] == 4
    assert job.to_dict()["hyperparameters"]["lora_target_modules"] == ["q_proj", "v_proj"]

    second = llm.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    page = llm.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more
    assert llm.fine_tuning.jobs.list(after=second.id).data[0].id == job.id
    assert llm.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert [e.message for e in llm.fine_tuning.jobs.list_events(job.id)] == [f"Created fine-tuning job: {job.id}"]

    assert job.id not in [j.id for j in other.fine_tuning.jobs.list().data]
    for call in (
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()

    for queued in (job, second):  # queued jobs are cancelled at once; nothing is left for the next test's worker
        assert llm.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="cannot be cancelled"):
        llm.fine_tuning.jobs.cancel(job.id)
    assert llm.fine_tuning.jobs.retrieve(job.id).finished_at is not None


def test_workers_cancel_a_running_job_survive_a_kill_and_the_result_is_served_at_once(env):
    llm = client(env)
    file_id = llm.files.create(file=("train.jsonl", jsonl(PAIRS)), purpose="fine-tune").id
    lora = {"lora": {"rank": 4, "alpha": 8}}
    long = llm.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, hyperparameters={"n_epochs": 500}, extra_body=lora
    )
    # 12 rows, 4 per step: 3 steps an epoch, 60 steps in all.
    job = llm.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, suffix="answers",
        hyperparameters={
            "n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 25, "early_stopping": False, "replay": False,
        },
        extra_body=lora,
    )  # fmt: skip
    worker_args = ("--poll-interval", "0.2", "--lease-seconds", "4")
    first = start_worker(env.data, env.home, *worker_args, "--checkpoint-every", "3")
    second = None
    try:
        # Cancel the first job while it trains: the worker stops at its next step and moves on to the next job.
        wait_for(lambda: any(e.type == "metrics" for e in all_events(llm, long.id)), "the first job's steps")
        assert llm.fine_tuning.jobs.retrieve(long.id).status == "running"
        assert llm.fine_tuning.jobs.cancel(long.id).status == "cancelled"
        wait_for(lambda: llm.fine_tuning.jobs.retrieve(job.id).status == "running", "the second job to run")
        messages = [e.message for e in all_events(llm, long.id)]
        assert any(m.startswith("stopped at step") for m in messages), messages
        assert llm.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
        assert not (env.data / "fine_tuning" / long.id).exists()

        # Kill the worker once the second job has a checkpoint; the server keeps answering meanwhile.
        wait_for(lambda: any(e.message.startswith("checkpoint") for e in all_events(llm, job.id)), "a checkpoint")
        first.kill()
        first.wait()
        answer = llm.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.choices[0].finish_reason in ("length", "stop")
        second = start_worker(env.data, env.home, *worker_args)
        done = wait_for(
            lambda: (j := llm.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
            "the job to finish on the second worker",
            timeout=180,
        )
    finally:
        first.kill()
        if second is not None:
            assert stop_worker(second) == 0
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "acme/tiny-answers" and done.trained_tokens > 0 and done.finished_at

    events = all_events(llm, job.id)
    messages = [e.message for e in events]
    assert any("stopped answering" in m and "attempt 2 of 3" in m for m in messages), messages
    assert any(m.startswith("resumed at step") for m in messages), messages
    steps = [e.data for e in events if e.type == "metrics"]
    assert {"step", "train_loss", "learning_rate", "tokens_per_second"} <= set(steps[-1])
    assert steps[-1]["step"] == steps[-1]["total_steps"] == 60

    # Served at once, to its tenant only.
    greedy = {"messages": [{"role": "user", "content": "question 3?"}], "max_tokens": 8, "temperature": 0}
    tuned = llm.chat.completions.create(model=done.fine_tuned_model, **greedy).choices[0].message.content
    plain = llm.chat.completions.create(model="tiny", **greedy).choices[0].message.content
    assert tuned != plain
    assert done.fine_tuned_model in [m.id for m in llm.models.list()]
    with pytest.raises(openai.NotFoundError):
        client(env, "globex").chat.completions.create(model=done.fine_tuned_model, **greedy)
