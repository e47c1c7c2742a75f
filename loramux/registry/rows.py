"""Rows of the metadata tables as the dataclasses of `store.py`, shared by the SQLite and PostgreSQL stores. A row is
any mapping from column name to value (`sqlite3.Row`, psycopg's `dict_row`); JSON columns hold JSON text."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from loramux.registry.store import FineTuningJob, JobEvent, Repo, Revision, UploadedFile

JSON_FIELDS = ("settings", "hyperparameters", "error")
JOB_FIELDS = tuple(f.name for f in fields(FineTuningJob))

Row = Mapping[str, Any]


def repo_of(row: Row) -> Repo:
    return Repo(row["id"], row["namespace"], row["name"], bool(row["private"]), row["created_at"])


def revision_of(row: Row) -> Revision:
    return Revision(row["commit_id"], row["repo_id"], row["parent"], row["message"], row["kind"], row["created_at"])


def upload_of(row: Row) -> UploadedFile:
    return UploadedFile(*(row[f.name] for f in fields(UploadedFile)))


def job_values(job: FineTuningJob) -> dict[str, Any]:
    """The job as column values, JSON fields as text."""
    return {name: json_value(name, getattr(job, name)) for name in JOB_FIELDS}


def check_job_fields(changes: Mapping[str, Any]) -> None:
    """Refuse an update of no field, of a field jobs do not have, or of the job's id."""
    if not changes or not set(changes) <= set(JOB_FIELDS) - {"id"}:
        raise ValueError(f"cannot update job fields {sorted(set(changes) - set(JOB_FIELDS))}")


def json_value(name: str, value: Any) -> Any:
    """A job field's column value (JSON fields as JSON text)."""
    return json.dumps(value) if name in JSON_FIELDS else value


def job_of(row: Row) -> FineTuningJob:
    values = {name: row[name] for name in JOB_FIELDS}
    for name in JSON_FIELDS:
        values[name] = None if values[name] is None else json.loads(values[name])
    return FineTuningJob(**values)


def event_of(row: Row) -> JobEvent:
    data = None if row["data"] is None else json.loads(row["data"])
    return JobEvent(row["id"], row["job_id"], row["created_at"], row["level"], row["type"], row["message"], data)
