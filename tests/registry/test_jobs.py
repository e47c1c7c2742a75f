"""Fine-tuning files and jobs in the registry: uploads checked line by line and owned by a tenant, atomic claims,
leases that expire into a retry or a failure, cancellation, events; no model involved."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from loramux.core.chat_data import DataError
from loramux.registry.jobs import FileNotFound, FineTuning, JobFinished, JobNotFound, new_id
from loramux.registry.registry import Caller
from loramux.registry.store import FineTuningJob

ACME, GLOBEX = Caller(tenant="acme"), Caller(tenant="globex")
LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.fixture
def ft(storage, tmp_path: Path) -> FineTuning:
    """Files and jobs on each deployment (SQLite + local blobs, PostgreSQL + S3)."""
    registry = storage.open(tmp_path / "data")
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    registry.create_key("acme")
    return FineTuning(registry)


def upload(ft: FineTuning, caller: Caller = ACME, text: str = LINE + "\n" + LINE + "\n", name: str = "t.jsonl"):
    return ft.upload(caller, name, "fine-tune", io.BytesIO(text.encode()), max_bytes=1 << 20)


def queue(ft: FineTuning, caller: Caller = ACME, max_attempts: int = 3) -> FineTuningJob:
    file = upload(ft, caller)
    job = FineTuningJob(
        id=new_id("ftjob"), tenant=None, model="tiny", base=None, training_file=file.id, validation_file=None,
        suffix=None, repo_id=f"{caller.tenant}/tiny-x", settings={"epochs": 1}, hyperparameters={"n_epochs": 1},
        seed=0, max_attempts=max_attempts,
    )  # fmt: skip
    return ft.create_job(caller, job)


def test_uploads_are_checked_line_by_line_and_belong_to_their_tenant(ft: FineTuning):
    record = upload(ft)
    assert record.examples == 2 and record.bytes == 2 * (len(LINE) + 1) and record.id.startswith("file-")
    assert ft.file_content(record.id).read_text() == LINE + "\n" + LINE + "\n"
    assert [f.id for f in ft.files(ACME)] == [record.id] and ft.files(GLOBEX) == []
    with pytest.raises(FileNotFound):
        ft.file(GLOBEX, record.id)
    with pytest.raises(FileNotFound):
        ft.delete_file(GLOBEX, record.id)

    with pytest.raises(DataError, match=r"bad.jsonl line 3: not valid JSON"):
        upload(ft, text=f"{LINE}\n\n{{oops\n{LINE}\n", name="bad.jsonl")
    no_assistant = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=r"x.jsonl line 2: .*assistant"):
        upload(ft, text=f"{LINE}\n{no_assistant}\n", name="x.jsonl")
    with pytest.raises(DataError, match="larger than the limit"):
        ft.upload(ACME, "big.jsonl", "fine-tune", io.BytesIO((LINE + "\n").encode() * 100), max_bytes=1000)
    with pytest.raises(ValueError, match="purpose must be 'fine-tune'"):
        ft.upload(ACME, "t.jsonl", "assistants", io.BytesIO(LINE.encode()), max_bytes=1000)
    assert [f.id for f in ft.files(ACME)] == [record.id]  # nothing of the refused uploads was recorded


def test_uploaded_content_survives_garbage_collection_until_deleted(ft: FineTuning):
    record = upload(ft)
    assert ft.registry.collect_garbage(grace_seconds=0) == 0
    assert ft.file_content(record.id).is_file()
    ft.delete_file(ACME, record.id)
    with pytest.raises(FileNotFound):
        ft.file_content(record.id)
    assert not ft.registry.blobs.exists(record.sha256)


def test_a_job_needs_the_callers_own_files(ft: FineTuning):
    theirs = upload(ft, GLOBEX)
    job = FineTuningJob(
        id=new_id("ftjob"), tenant=None, model="tiny", base=None, training_file=theirs.id, validation_file=None,
        suffix=None, repo_id="acme/tiny-x", settings={}, hyperparameters={}, seed=0,
    )  # fmt: skip
    with pytest.raises(FileNotFound):
        ft.create_job(ACME, job)


def test_one_claim_per_job_even_when_workers_race(ft: FineTuning):
    jobs = [queue(ft) for _ in range(3)]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := FineTuning(ft.registry).claim(name, lease_seconds=60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.id for j in jobs)  # each job exactly once
    first = ft.store.get_job(jobs[0].id)
    assert first.status == "validating_files" and first.attempts == 1 and first.worker is not None


def test_claims_go_oldest_first_and_progress_only_while_claimed(ft: FineTuning):
    older, newer = queue(ft), queue(ft)
    job = ft.claim("w1", lease_seconds=60)
    assert job.id == older.id
    assert not ft.mark_running(job.id, "w2")  # not its claim
    assert ft.mark_running(job.id, "w1") and ft.store.get_job(job.id).status == "running"
    assert ft.renew(job.id, "w1", 60)
    assert ft.succeed(job.id, "w1", "acme/tiny-x", "a" * 40, trained_tokens=123)
    done = ft.job(ACME, job.id)
    assert (done.status, done.fine_tuned_model, done.trained_tokens) == ("succeeded", "acme/tiny-x", 123)
    assert done.finished_at is not None
    assert not ft.renew(job.id, "w1", 60)  # a finished job has no claim left to renew
    assert ft.claim("w1", 60).id == newer.id and ft.claim("w1", 60) is None


def test_an_expired_lease_is_retried_then_failed_after_the_last_attempt(ft: FineTuning):
    job = queue(ft, max_attempts=2)
    t0 = ft.store.get_job(job.id).created_at
    assert ft.claim("dead-1", lease_seconds=10, now=t0).id == job.id
    assert ft.claim("w2", lease_seconds=10, now=t0 + 5) is None  # the lease still holds

    again = ft.claim("w2", lease_seconds=10, now=t0 + 11)  # dead-1 never renewed
    assert again.id == job.id and again.attempts == 2 and again.worker == "w2"
    assert not ft.mark_running(job.id, "dead-1")  # a worker that lost its claim cannot write any more

    assert ft.claim("w3", lease_seconds=10, now=t0 + 30) is None  # w2 died too, on the last attempt
    failed = ft.job(ACME, job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    assert "last of 2 attempts" in failed.error["message"]
    messages = [e.message for e in ft.events(ACME, job.id, None, 100)[0]]
    assert any("queued again" in m and "attempt 2 of 2" in m for m in messages)
    assert "Fine-tuning job failed" in messages[0]  # newest first


def test_a_released_job_is_queued_again_without_spending_an_attempt(ft: FineTuning):
    job = queue(ft, max_attempts=1)
    ft.claim("w1", 60)
    assert ft.release(job.id, "w1") and ft.store.get_job(job.id).status == "queued"
    assert ft.claim("w2", 60).attempts == 1


def test_cancel_stops_queued_and_running_jobs_but_not_finished_ones(ft: FineTuning):
    queued = queue(ft)
    running = queue(ft)
    ft.claim("w1", 60)  # takes `queued`, the oldest
    assert ft.cancel(ACME, queued.id).status == "cancelled"
    assert not ft.renew(queued.id, "w1", 60) and not ft.still_claimed(queued.id, "w1")  # the worker will stop
    with pytest.raises(JobNotFound):
        ft.cancel(GLOBEX, running.id)
    assert ft.cancel(ACME, running.id).status == "cancelled"
    with pytest.raises(JobFinished, match="already cancelled"):
        ft.cancel(ACME, running.id)
    assert ft.claim("w1", 60) is None


def test_jobs_and_events_page_newest_first_per_tenant(ft: FineTuning):
    ids = [queue(ft).id for _ in range(5)]
    theirs = queue(ft, GLOBEX)
    page, more = ft.jobs(ACME, limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and more
    page, more = ft.jobs(ACME, after=page[-1].id, limit=10)
    assert [j.id for j in page] == ids[::-1][2:] and not more
    assert [j.id for j in ft.jobs(GLOBEX)[0]] == [theirs.id]
    with pytest.raises(JobNotFound):
        ft.job(GLOBEX, ids[0])

    for step in range(1, 4):
        ft.add_event(ids[0], f"step {step}", type="metrics", data={"step": step, "train_loss": 1.0 / step})
    events, more = ft.events(ACME, ids[0], None, 2)
    assert [e.data["step"] for e in events] == [3, 2] and more
    rest, more = ft.events(ACME, ids[0], events[-1].id, 10)
    assert [e.message for e in rest] == ["step 1", f"Created fine-tuning job: {ids[0]}"] and not more
    with pytest.raises(JobNotFound):
        ft.events(GLOBEX, ids[0], None, 10)
