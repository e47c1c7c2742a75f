"""OpenAI's fine-tuning API on `loramux serve`: training files (`/v1/files`) and fine-tuning jobs
(`/v1/fine_tuning/jobs`, with events and cancel). The server only validates and queues: training runs in
`loramux train-worker` processes, so serving never waits for it. Files, jobs and the adapters jobs produce belong to
the caller's tenant; another tenant's file or job gets the same 404 as one that does not exist.

Hyperparameters (under `hyperparameters`, or `method.supervised.hyperparameters`): `n_epochs`, `batch_size`,
`learning_rate_multiplier` (times 2e-4), each also "auto"; the LoRA as `lora_rank`, `lora_alpha`, `lora_dropout`,
`lora_target_modules`, `use_rslora`; and `max_seq_len`, `warmup_ratio`, `gradient_checkpointing`, `early_stopping`
(default true), `replay` (the base's own answers to general prompts trained on beside a small data set; default
auto), `keep_answers` (prompts whose answers must not change). `auto` epochs and learning rate are decided
by the worker from the data set's size; the job's first event says what it chose. The LoRA may
instead come as a top-level `lora` object: `{"rank", "alpha", "dropout", "target_modules", "use_rslora"}`.
"""

# No `from __future__ import annotations`: FastAPI must see the route signatures' real types.
import os
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from loramux.core.chat_data import DataError
from loramux.core.train_spec import TrainingSpec, TrainingSpecError
from loramux.registry.jobs import (
    LOCAL_TENANT_NAMESPACE,
    FileNotFound,
    FineTuning,
    FineTuningJob,
    JobEvent,
    JobFinished,
    JobNotFound,
    UploadedFile,
    new_id,
)
from loramux.registry.names import InvalidNameError, check_part
from loramux.registry.registry import Caller
from loramux.server.api.auth import caller_of
from loramux.server.api.errors import APIError
from loramux.server.api.state import ServerState

Who = Annotated[Caller, Depends(caller_of)]
MiB = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 512 * MiB
BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier multiplies
MAX_SUFFIX = 64

# API name -> TrainingSpec setting.
HYPERPARAMETERS = {
    "n_epochs": "epochs",
    "batch_size": "batch_size",
    "lora_rank": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "use_rslora": "use_rslora",
    "max_seq_len": "max_seq_len",
    "warmup_ratio": "warmup_ratio",
    "gradient_checkpointing": "gradient_checkpointing",
    "early_stopping": "early_stopping",
    "replay": "replay",
    "keep_answers": "keep_answers",
}
LORA_FIELDS = {
    "rank": "lora_rank",
    "r": "lora_rank",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
    "use_rslora": "use_rslora",
}
# Settings the worker fills in per run; the rest of a spec is decided when the job is created.
WORKER_SETTINGS = ("data", "validation_data", "output_dir", "base", "device", "checkpoint_every")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=100)
    validation_file: str | None = Field(default=None, max_length=100)
    suffix: str | None = Field(default=None, max_length=MAX_SUFFIX)
    hyperparameters: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


def fine_tuning_router() -> APIRouter:
    router = APIRouter(prefix="/v1")
    _add_file_routes(router, int(os.environ.get("LORAMUX_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)))
    _add_job_routes(router)
    return router


def _add_file_routes(router: APIRouter, max_upload: int) -> None:
    """`/v1/files`: upload (checked line by line), list, retrieve and delete training files."""

    @router.post("/files")
    def upload_file(
        request: Request, who: Who, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict:
        if file.size is not None and file.size > max_upload:
            raise APIError(413, f"The file is larger than the limit of {max_upload} bytes.", param="file")
        name = (file.filename or "upload.jsonl")[-255:]
        try:
            record = _fine_tuning(request).upload(who, name, purpose, file.file, max_upload)
        except DataError as exc:
            raise APIError(400, f"Invalid file format: {exc}", param="file", code="invalid_file_format") from None
        except ValueError as exc:  # the purpose, or the size limit while storing
            raise APIError(400, str(exc), param="purpose" if "purpose" in str(exc) else "file") from None
        return _file_object(record)

    @router.get("/files")
    def list_files(request: Request, who: Who, purpose: str | None = None) -> dict:
        records = [f for f in _fine_tuning(request).files(who) if purpose in (None, f.purpose)]
        return {"object": "list", "data": [_file_object(f) for f in records], "has_more": False}

    @router.get("/files/{file_id}")
    def retrieve_file(request: Request, file_id: str, who: Who) -> dict:
        return _file_object(_file(request, who, file_id))

    @router.delete("/files/{file_id}")
    def delete_file(request: Request, file_id: str, who: Who) -> dict:
        try:
            _fine_tuning(request).delete_file(who, file_id)
        except FileNotFound as exc:
            raise APIError(404, str(exc), param="file_id", code="file_not_found") from None
        return {"id": file_id, "object": "file", "deleted": True}


def _add_job_routes(router: APIRouter) -> None:
    """`/v1/fine_tuning/jobs`: create (validated and queued for a worker), list, retrieve, events and cancel."""

    @router.post("/fine_tuning/jobs")
    def create_job(request: Request, body: JobRequest, who: Who) -> dict:
        job = _new_job(request, body, who)
        return _job_object(_fine_tuning(request).create_job(who, job))

    @router.get("/fine_tuning/jobs")
    def list_jobs(
        request: Request, who: Who, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> dict:
        jobs, more = _fine_tuning(request).jobs(who, after, limit)
        return {"object": "list", "data": [_job_object(j) for j in jobs], "has_more": more}

    @router.get("/fine_tuning/jobs/{job_id}")
    def retrieve_job(request: Request, job_id: str, who: Who) -> dict:
        return _job_object(_job(request, who, job_id))

    @router.get("/fine_tuning/jobs/{job_id}/events")
    def list_events(
        request: Request,
        job_id: str,
        who: Who,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    ) -> dict:
        try:
            events, more = _fine_tuning(request).events(who, job_id, after, limit)
        except JobNotFound as exc:
            raise APIError(404, str(exc), param="fine_tuning_job_id", code="fine_tune_not_found") from None
        return {"object": "list", "data": [_event_object(e) for e in events], "has_more": more}

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str, who: Who) -> dict:
        try:
            return _job_object(_fine_tuning(request).cancel(who, job_id))
        except JobNotFound as exc:
            raise APIError(404, str(exc), param="fine_tuning_job_id", code="fine_tune_not_found") from None
        except JobFinished as exc:
            raise APIError(400, str(exc), param="fine_tuning_job_id", code="job_not_cancellable") from None


def _new_job(request: Request, body: JobRequest, who: Caller) -> FineTuningJob:
    """The job `body` asks for, its settings checked and its files found; refused with a 400 otherwise."""
    state = _state(request)
    state.require_engine()
    if body.model not in state.base_names:
        raise APIError(
            400,
            f"Model '{body.model}' cannot be fine-tuned here: this server fine-tunes its base '{state.base_id}'.",
            param="model",
            code="model_not_available",
        )
    settings, shown = _training_settings(body, _max_rank(state))
    job_id = new_id("ftjob")
    repo_id = _repo_id(who, state.base_id, body.suffix, job_id)
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is not None:
            try:
                _fine_tuning(request).file(who, file_id)
            except FileNotFound:
                message = f"{param}: no such file {file_id}"
                raise APIError(400, message, param=param, code="file_not_found") from None
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    return FineTuningJob(
        id=job_id, tenant=who.tenant, model=state.base_id, base=state.settings.base,
        training_file=body.training_file, validation_file=body.validation_file, suffix=body.suffix,
        repo_id=repo_id, settings={**settings, "seed": seed}, hyperparameters=shown, seed=seed,
    )  # fmt: skip


def _state(request: Request) -> ServerState:
    return request.app.state.loramux


def _fine_tuning(request: Request) -> FineTuning:
    return FineTuning(_state(request).registry)


def _file(request: Request, who: Caller, file_id: str) -> UploadedFile:
    try:
        return _fine_tuning(request).file(who, file_id)
    except FileNotFound as exc:
        raise APIError(404, str(exc), param="file_id", code="file_not_found") from None


def _job(request: Request, who: Caller, job_id: str) -> FineTuningJob:
    try:
        return _fine_tuning(request).job(who, job_id)
    except JobNotFound as exc:
        raise APIError(404, str(exc), param="fine_tuning_job_id", code="fine_tune_not_found") from None


def _max_rank(state: ServerState) -> int | None:
    """The highest adapter rank the running engine serves (a job must not train what it could not serve)."""
    return getattr(state.info, "max_lora_rank", None)


def _training_settings(body: JobRequest, max_rank: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's `TrainingSpec` settings (checked) and the hyperparameters as the job object shows them."""
    given = dict(body.hyperparameters or {})
    if body.method is not None:
        if body.method.get("type", "supervised") != "supervised":
            raise APIError(400, "method.type: only 'supervised' fine-tuning is supported", param="method.type")
        given.update(((body.method.get("supervised") or {}).get("hyperparameters")) or {})
    for key, value in (body.lora or {}).items():
        if key not in LORA_FIELDS:
            raise APIError(400, f"lora.{key}: unknown LoRA setting; use {', '.join(LORA_FIELDS)}", param=f"lora.{key}")
        given[LORA_FIELDS[key]] = value
    settings: dict[str, Any] = {}
    for key, value in given.items():
        if key != "learning_rate_multiplier" and key not in HYPERPARAMETERS:
            known = ", ".join(["learning_rate_multiplier", *HYPERPARAMETERS])
            raise APIError(400, f"hyperparameters.{key}: unknown hyperparameter; use {known}", param=key)
        if value == "auto":
            continue
        if key == "learning_rate_multiplier":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1000:
                raise APIError(400, f"{key} must be a number above 0 and at most 1000; got {value!r}", param=key)
            settings["learning_rate"] = BASE_LEARNING_RATE * value
        else:
            settings[HYPERPARAMETERS[key]] = value
    try:
        spec = TrainingSpec.from_dict({**settings, "data": ["training_file"], "output_dir": "job"})
    except TrainingSpecError as exc:
        raise APIError(400, _api_names(str(exc)), param="hyperparameters", code="invalid_hyperparameters") from None
    if max_rank is not None and spec.r > max_rank:
        raise APIError(
            400,
            f"lora_rank {spec.r} is above the highest rank this server serves ({max_rank})",
            param="hyperparameters.lora_rank",
            code="invalid_hyperparameters",
        )
    shown = {
        "n_epochs": spec.epochs,  # "auto" until the worker decides it from the data (its first event says)
        "batch_size": spec.batch_size,
        "learning_rate_multiplier": "auto" if spec.learning_rate == "auto" else spec.learning_rate / BASE_LEARNING_RATE,
        "lora_rank": spec.r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "lora_target_modules": spec.target_modules,
        "use_rslora": spec.use_rslora,
    }
    shown.update({key: value for key, value in given.items() if key not in shown and value != "auto"})
    kept = {k: v for k, v in spec.to_dict().items() if k not in WORKER_SETTINGS}
    return kept, shown


def _api_names(message: str) -> str:
    """A TrainingSpec message speaks of its own setting names; say the API's."""
    head, _, rest = message.partition(" ")
    for api_name, setting in HYPERPARAMETERS.items():
        if head == setting:
            return f"{api_name} {rest}"
    return message


def _repo_id(who: Caller, base_id: str, suffix: str | None, job_id: str) -> str:
    """`<tenant namespace>/<base short name>-<suffix or job id>`: where the adapter is registered."""
    namespace = who.tenant or LOCAL_TENANT_NAMESPACE
    short = base_id.rsplit("/", 1)[-1]
    try:
        return f"{namespace}/{check_part(f'{short}-{suffix or job_id}', 'adapter name')}"
    except InvalidNameError:
        raise APIError(
            400, f"suffix {suffix!r} is not allowed: use letters, digits, '_', '.', '-'", param="suffix"
        ) from None


def _file_object(record: UploadedFile) -> dict:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


def _job_object(job: FineTuningJob) -> dict:
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": None if job.finished_at is None else int(job.finished_at),
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant or LOCAL_TENANT_NAMESPACE,
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": job.hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "seed": job.seed,
        "user_provided_suffix": job.suffix,
        "result_files": [],
        "integrations": [],
        "estimated_finish": None,
        "metadata": None,
    }


def _event_object(event: JobEvent) -> dict:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": int(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }
