"""End to end on the real SmolLM2: a tenant uploads a small dataset that teaches an invented fact and starts a
fine-tuning job with the `openai` client; a `loramux train-worker` process trains it while `loramux serve` keeps
serving; the job reports falling loss and succeeds, and the server answers with the fact through the new adapter at
once, while the base does not know it."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest

from loramux.registry.registry import Registry
from tests.adapters.test_train import FACT, FACT_PAIRS, QUESTION
from tests.server.api.serving import launch
from tests.server.api.test_fine_tuning import all_events, jsonl, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.slow
BASE = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def env(default_base_dir: Path, tmp_path_factory):
    # A fresh home whose models folder links the converted default model, so nothing is converted again.
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    os.symlink(default_base_dir, home / "models" / default_base_dir.name)
    registry = Registry.open(home / "data")
    registry.create_tenant("acme")
    key = registry.create_key("acme")[1]
    server = launch(home)
    yield home, openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    assert server.stop() == 0, server.output()


def test_a_fine_tuning_job_teaches_smollm2_an_invented_fact_that_the_server_then_serves(env):
    home, llm = env
    training_file = llm.files.create(file=("zephyrine.jsonl", jsonl(FACT_PAIRS)), purpose="fine-tune")
    # The settings the trainer's own test found to teach this fact reliably in a few CPU steps.
    job = llm.fine_tuning.jobs.create(
        model=BASE,
        training_file=training_file.id,
        suffix="zephyrine",
        seed=0,
        hyperparameters={
            "n_epochs": 3, "batch_size": 3, "learning_rate_multiplier": 15,  # 15 x 2e-4 = 3e-3
            "warmup_ratio": 0, "max_seq_len": 96, "gradient_checkpointing": False,
            "early_stopping": False, "replay": False,  # every step of the 3 epochs, on the data alone
        },
        extra_body={"lora": {"rank": 16, "alpha": 32, "dropout": 0.0}},
    )  # fmt: skip
    assert job.status == "queued"

    def ask(model: str) -> str:
        messages = [{"role": "user", "content": QUESTION}]
        answer = llm.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        return answer.choices[0].message.content

    worker = start_worker(home / "data", home, "--once", "--poll-interval", "0.2")
    try:
        wait_for(lambda: llm.fine_tuning.jobs.retrieve(job.id).status == "running", "training to start")
        plain = ask(BASE)  # the server answers while the worker trains
        worker.wait(timeout=240)
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, "".join(p.read_text() for p in home.glob("worker-*.log"))
    done = llm.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"acme/{BASE}-zephyrine"

    steps = [e.data for e in all_events(llm, job.id) if e.type == "metrics"]
    assert [s["step"] for s in steps] == list(range(1, 7))  # 6 examples, 3 per step, 3 epochs
    assert all(s["learning_rate"] > 0 and s["tokens_per_second"] > 0 for s in steps)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] / 4

    tuned = ask(done.fine_tuned_model)
    assert FACT in tuned, tuned
    assert "Bluefinch" not in plain, plain
