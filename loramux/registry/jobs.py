"""Fine-tuning in the registry: uploaded training files and fine-tuning jobs, owned by a tenant.

The API (`loramux serve`) uploads files and queues jobs; training workers (`loramux train-worker`, other processes)
claim queued jobs through the same metadata store. A claim is a lease: the worker renews it while it trains, and a
worker that dies loses the job when its lease expires; the next claim retries it (from the checkpoint the dead worker
left) until `max_attempts` claims have been spent, then it fails. Imports no torch.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from typing import BinaryIO

from loramux.core.chat_data import DataError, parse_chat_lines
from loramux.registry.registry import Caller, Registry
from loramux.registry.store import (
    CLAIMED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    FineTuningJob,
    JobEvent,
    UploadedFile,
)

PURPOSE = "fine-tune"
LOCAL_TENANT_NAMESPACE = "local"  # the namespace of single-user mode's adapters (as the hub's whoami says)


class FileNotFound(LookupError):
    """No such file, or one of another tenant: the two are never told apart."""


class JobNotFound(LookupError):
    """No such job, or one of another tenant."""


class JobFinished(ValueError):
    """The job has already ended (it cannot be cancelled any more)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class FineTuning:
    """Files and jobs with tenant checks, on a registry's metadata store and blob store."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.store = registry.store

    # --- files
    def upload(self, caller: Caller, filename: str, purpose: str, stream: BinaryIO, max_bytes: int) -> UploadedFile:
        """Check a chat JSONL upload line by line (`DataError` names the first bad line), then store it.

        `stream` must be seekable: it is read once to check and once to store."""
        if purpose != PURPOSE:
            raise ValueError(f"purpose must be {PURPOSE!r}; got {purpose!r}")
        examples = len(parse_chat_lines(_lines(stream, max_bytes), source=filename))
        stream.seek(0)
        sha256, size = self.registry.store_blob(stream, max_bytes=max_bytes)
        record = UploadedFile(new_id("file"), caller.tenant, filename, purpose, sha256, size, examples, time.time())
        self.store.add_upload(record)
        return record

    def file(self, caller: Caller, file_id: str) -> UploadedFile:
        record = self.store.get_upload(file_id) if isinstance(file_id, str) else None
        if record is None or not _sees(caller, record.tenant):
            raise FileNotFound(f"No such File object: {file_id}")
        return record

    def files(self, caller: Caller) -> list[UploadedFile]:
        """Newest first."""
        return [f for f in self.store.list_uploads(None if caller.local else caller.tenant) if _sees(caller, f.tenant)]

    def delete_file(self, caller: Caller, file_id: str) -> None:
        """Forget the file and delete its content unless something else holds the same bytes. A job that has not
        started yet and trains on it will fail with a clear error."""
        record = self.file(caller, file_id)
        with self.registry.holding_blobs(exclusive=True):
            self.store.delete_upload(record.id)
            if record.sha256 not in self.store.referenced_blobs():
                self.registry.blobs.delete(record.sha256)

    def file_content(self, file_id: str):
        """The verified local path of a file's content (for the worker); `FileNotFound` once deleted."""
        record = self.store.get_upload(file_id)
        if record is None:
            raise FileNotFound(f"file {file_id} was deleted")
        return self.registry.blobs.verified_path(record.sha256)

    # --- jobs, as the API sees them
    def create_job(self, caller: Caller, job: FineTuningJob) -> FineTuningJob:
        """Queue `job` (its files must be the caller's) and record its first event."""
        self.file(caller, job.training_file)
        if job.validation_file is not None:
            self.file(caller, job.validation_file)
        job = replace(job, tenant=caller.tenant, status=QUEUED)
        self.store.add_job(job)
        self.add_event(job.id, f"Created fine-tuning job: {job.id}")
        return job

    def job(self, caller: Caller, job_id: str) -> FineTuningJob:
        job = self.store.get_job(job_id) if isinstance(job_id, str) else None
        if job is None or not _sees(caller, job.tenant):
            raise JobNotFound(f"No such fine-tuning job: {job_id}")
        return job

    def jobs(self, caller: Caller, after: str | None = None, limit: int = 20) -> tuple[list[FineTuningJob], bool]:
        """A page of the caller's jobs, newest first, after the job `after`; and whether more follow."""
        tenant = None if caller.local else caller.tenant
        page = self.store.list_jobs(tenant, caller.local, after, limit + 1)
        return page[:limit], len(page) > limit

    def cancel(self, caller: Caller, job_id: str) -> FineTuningJob:
        """Cancel a queued or running job; a worker running it stops at its next step."""
        job = self.job(caller, job_id)
        if not self.store.cancel_job(job.id, time.time()):
            raise JobFinished(f"Job {job_id} has already {self.store.get_job(job.id).status}: it cannot be cancelled")
        self.add_event(job.id, "Fine-tuning job cancelled", level="warn")
        return self.store.get_job(job.id)

    def events(self, caller: Caller, job_id: str, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
        """A page of a job's events, newest first (as OpenAI lists them), after the event `after`."""
        job = self.job(caller, job_id)
        page = self.store.list_events(job.id, after, limit + 1)
        return page[:limit], len(page) > limit

    # --- jobs, as a worker sees them
    def claim(self, worker: str, lease_seconds: float, now: float | None = None) -> FineTuningJob | None:
        """Claim the oldest queued job for `worker` (status validating_files); None when none is queued. First
        sends jobs whose lease has expired back to the queue, or fails them after their last attempt."""
        now = time.time() if now is None else now
        for job, status in self.store.expire_leases(now):
            if status == FAILED:
                message = f"Worker {job.worker} stopped answering on the last of {job.max_attempts} attempts"
                self.add_event(job.id, f"Fine-tuning job failed: {message}", level="error")
            else:
                self.add_event(
                    job.id,
                    f"Worker {job.worker} stopped answering; the job is queued again and resumes from its last "
                    f"checkpoint (attempt {job.attempts + 1} of {job.max_attempts})",
                    level="warn",
                )
        job = self.store.claim_job(worker, now, lease_seconds)
        if job is not None:
            self.add_event(job.id, f"Worker {worker} claimed the job (attempt {job.attempts} of {job.max_attempts})")
        return job

    def renew(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend the worker's lease; False when it no longer holds the job (cancelled, or the lease was lost)."""
        return self.store.update_claimed(job_id, worker, lease_expires_at=time.time() + lease_seconds)

    def still_claimed(self, job_id: str, worker: str) -> bool:
        job = self.store.get_job(job_id)
        return job is not None and job.worker == worker and job.status in CLAIMED

    def mark_running(self, job_id: str, worker: str) -> bool:
        return self.store.update_claimed(job_id, worker, status=RUNNING)

    def succeed(self, job_id: str, worker: str, repo_id: str, commit: str, trained_tokens: int | None) -> bool:
        return self.store.update_claimed(
            job_id, worker, status=SUCCEEDED, fine_tuned_model=repo_id, result_commit=commit,
            trained_tokens=trained_tokens, finished_at=time.time(), lease_expires_at=None,
        )  # fmt: skip

    def fail(self, job_id: str, worker: str, code: str, message: str, param: str | None = None) -> bool:
        error = {"code": code, "message": message, "param": param}
        if not self.store.update_claimed(
            job_id, worker, status=FAILED, error=error, finished_at=time.time(), lease_expires_at=None
        ):
            return False
        self.add_event(job_id, message, level="error")
        return True

    def release(self, job_id: str, worker: str) -> bool:
        """Give a claimed job back to the queue (a worker shutting down); the claim does not count as an attempt."""
        return self.store.release_job(job_id, worker)

    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> JobEvent:
        event = JobEvent(new_id("ftevent"), job_id, time.time(), level, type, message, data)
        self.store.add_event(event)
        return event


def _sees(caller: Caller, tenant: str | None) -> bool:
    return caller.local or (caller.tenant is not None and caller.tenant == tenant)


def _lines(stream: BinaryIO, max_bytes: int):
    """The stream's lines (bytes), refusing more than `max_bytes` in all."""
    total = 0
    for line in stream:
        total += len(line)
        if total > max_bytes:
            raise DataError(f"the file is larger than the limit of {max_bytes} bytes")
        yield line
