"""`loramux train-worker`: the training sidecar. Claims queued fine-tuning jobs from the registry, trains each with
QLoRA (`loramux.adapters.train`), reports progress as job events and registers the adapter as a new revision of the
job's repo, owned by the job's tenant. It runs beside `loramux serve`, never inside it.

A claim is a lease renewed by a heartbeat thread. A worker killed mid-job loses its claim when the lease ends; the
next claim (by any worker sharing the data directory) resumes from the checkpoint the job's work directory holds.
SIGTERM stops the run at the next step, checkpoints it and puts the job back in the queue.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path

from loramux.registry.cli.common import add_storage_arguments, database_url, open_registry

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_arguments(parser)
    parser.add_argument(
        "--poll-interval", type=float, default=2.0, help="seconds between looks at the queue when it is empty"
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="how long a claim lasts without a heartbeat; a dead worker's job is retried after this (default 60)",
    )
    parser.add_argument("--once", action="store_true", help="run at most one job (none if none is queued), then exit")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="optimizer steps between checkpoints (default 10)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    if args.poll_interval <= 0:
        raise ValueError("--poll-interval must be above 0")
    if args.lease_seconds < 1:
        raise ValueError("--lease-seconds must be at least 1")
    if args.checkpoint_every < 0:
        raise ValueError("--checkpoint-every must not be negative")
    from loramux.core import paths
    from loramux.registry.jobs import FineTuning

    data_dir = Path(args.data_dir) if args.data_dir is not None else paths.data_dir()
    worker = TrainWorker(
        FineTuning(open_registry(args)),
        work_root=data_dir / "fine_tuning",
        lease_seconds=args.lease_seconds,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    queue = "the registry database" if database_url(args) else data_dir
    print(f"loramux train-worker {worker.name}: waiting for fine-tuning jobs in {queue}", flush=True)
    while not worker.stopping.is_set():
        if worker.run_one() or args.once:
            if args.once:
                break
            continue
        worker.stopping.wait(args.poll_interval)
    return 0


class TrainWorker:
    def __init__(
        self, jobs, work_root: Path, lease_seconds: float, checkpoint_every: int, device: str | None = None
    ) -> None:
        self.jobs = jobs  # a registry.jobs.FineTuning
        self.work_root = work_root
        self.lease_seconds = lease_seconds
        self.checkpoint_every = checkpoint_every
        self.device = device
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run_one(self) -> bool:
        """Claim and run one job; False when none was queued."""
        job = self.jobs.claim(self.name, self.lease_seconds)
        if job is None:
            return False
        print(f"job {job.id}: claimed (attempt {job.attempts} of {job.max_attempts})", flush=True)
        lost = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job.id, lost), daemon=True)
        heartbeat.start()
        try:
            outcome = self._run(job, lost)
        finally:
            lost.set()  # ends the heartbeat
            heartbeat.join()
        print(f"job {job.id}: {outcome}", flush=True)
        return True

    def _heartbeat(self, job_id: str, lost: threading.Event) -> None:
        while not lost.wait(self.lease_seconds / 3):
            try:
                if not self.jobs.renew(job_id, self.name, self.lease_seconds):
                    lost.set()  # cancelled, or the lease ran out: the training loop stops at its next step
            except Exception:  # a busy database: the next beat tries again, well within the lease
                log.warning("heartbeat for %s failed", job_id, exc_info=True)

    def _run(self, job, lost: threading.Event) -> str:
        from loramux.adapters.train import TrainingStopped, train
        from loramux.core.train_spec import TrainingSpec
        from loramux.registry.jobs import FileNotFound

        work = self.work_root / job.id
        try:
            spec = TrainingSpec.from_dict(
                {
                    **job.settings,
                    "data": [str(self._copy_file(job.training_file, work / "data" / "train.jsonl"))],
                    "validation_data": str(self._copy_file(job.validation_file, work / "data" / "validation.jsonl"))
                    if job.validation_file
                    else None,
                    "output_dir": str(work / "run"),
                    "base": job.base,
                    "device": self.device,
                    "checkpoint_every": self.checkpoint_every,
                }
            )
            progress = _Progress(self.jobs, job.id, self.name)
            adapter = train(spec, progress.on_event, lambda: self.stopping.is_set() or lost.is_set())
            if not self.jobs.still_claimed(job.id, self.name):
                return self._stopped(job, work)
            repo_id, commit = self._register(job, adapter)
            self.jobs.succeed(job.id, self.name, repo_id, commit, progress.trained_tokens)
            self.jobs.add_event(job.id, f"New fine-tuned model created: {repo_id} (revision {commit})")
            self.jobs.add_event(job.id, "The job has successfully completed")
            shutil.rmtree(work, ignore_errors=True)
            return f"succeeded: {repo_id}@{commit}"
        except TrainingStopped:
            return self._stopped(job, work)
        except (FileNotFound, ValueError, OSError) as exc:  # bad data or settings, a missing base, a refused commit
            return self._fail(job, work, "invalid_training_job", str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            return self._fail(job, work, "training_error", f"{type(exc).__name__}: {exc}")

    def _copy_file(self, file_id: str, target: Path) -> Path:
        """The uploaded file's bytes in the job's work directory (kept there for a retry after a crash)."""
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            shutil.copyfile(self.jobs.file_content(file_id), partial)
            os.replace(partial, target)
        return target

    def _stopped(self, job, work: Path) -> str:
        current = self.jobs.store.get_job(job.id)
        if current is not None and current.status == "cancelled":
            shutil.rmtree(work, ignore_errors=True)
            return "cancelled"
        if self.stopping.is_set() and self.jobs.release(job.id, self.name):
            self.jobs.add_event(job.id, "The worker is shutting down; the job is queued again", level="warn")
            return "queued again (worker shutting down)"
        return "claim lost (lease expired); another worker resumes it"

    def _fail(self, job, work: Path, code: str, message: str) -> str:
        self.jobs.fail(job.id, self.name, code, message)
        shutil.rmtree(work, ignore_errors=True)
        return f"failed: {message}"

    def _register(self, job, adapter: Path) -> tuple[str, str]:
        """Push the adapter's files as a new revision of the job's repo (created private on the first job)."""
        from loramux.registry.registry import AddFile, Caller
        from loramux.registry.store import RepoExistsError

        registry = self.jobs.registry
        caller = Caller(tenant=job.tenant) if job.tenant else Caller(local=True)
        # An earlier job with the same suffix made the repo already: this one becomes its newest revision.
        with contextlib.suppress(RepoExistsError):
            registry.create_repo(job.repo_id, caller, private=True)
        operations = []
        for path in sorted(adapter.iterdir()):
            if path.is_file() and not path.name.startswith("."):  # the trainer's hidden bookkeeping stays behind
                with path.open("rb") as stream:
                    sha256, size = registry.store_blob(stream)
                operations.append(AddFile(path.name, sha256, size))
        revision = registry.commit(job.repo_id, caller, operations, f"Fine-tuning job {job.id}")
        return job.repo_id, revision.commit


class _Progress:
    """Turns the trainer's events into job events; sets the job running when training starts."""

    def __init__(self, jobs, job_id: str, worker: str) -> None:
        self.jobs, self.job_id, self.worker = jobs, job_id, worker
        self.trained_tokens = 0

    def on_event(self, event) -> None:
        if event.kind == "started":
            self.jobs.mark_running(self.job_id, self.worker)
        if event.kind == "step":
            self.trained_tokens += event.tokens or 0
            data = {
                "step": event.step,
                "total_steps": event.total_steps,
                "epoch": event.epoch,
                "train_loss": event.loss,
                "learning_rate": event.learning_rate,
                "tokens_per_second": event.tokens_per_second,
            }
            self.jobs.add_event(self.job_id, f"Step {event.step}/{event.total_steps}: training loss={event.loss:.4f}",
                                type="metrics", data=data)  # fmt: skip
        elif event.kind == "validation":
            data = {"step": event.step, "total_steps": event.total_steps, "valid_loss": event.val_loss}
            self.jobs.add_event(self.job_id, event.message, type="metrics", data=data)
        else:
            self.jobs.add_event(self.job_id, event.message)
