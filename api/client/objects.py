"""The API's objects as the client returns them (JSON dicts, typed for editors and mypy),
the job statuses that are final, the file slots of a job spec, and an invalid file's
problems as lines a person reads."""

from __future__ import annotations

import os
from typing import Any, NotRequired, TypedDict

TERMINAL = ("succeeded", "failed", "cancelled")
# Each file slot of a job spec and the purpose its upload needs (the service's
# core.service.enums.FILE_SLOTS; a test keeps the two equal).
FILE_SLOTS: dict[str, str] = {
    "forget_file": "forget",
    "retain_file": "retain",
    "contrast_file": "contrast",
    "distill_file": "distill",
    **{
        f"eval.{name}": "eval"
        for name in (
            "forget_qa",
            "retain_qa",
            "neighbor_qa",
            "forget_text",
            "retain_text",
            "forget_mc",
            "general_mc",
            "holdout",
        )
    },
}


class Problem(TypedDict):
    line: int | None
    field: str | None
    message: str


class Validation(TypedDict):
    kind: str | None
    records: int
    problems: list[Problem]
    problems_total: int
    summary: str


class File(TypedDict):
    id: str
    object: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    status: str
    kind: str | None
    records: int | None
    validation: Validation | None
    metadata: dict[str, str]
    created_at: str


class Progress(TypedDict):
    phase: str | None
    step: int
    total_steps: int | None
    fraction: float | None
    loss: float | None
    resumed_from_step: int | None


class JobError(TypedDict):
    code: str
    message: str


class Job(TypedDict):
    id: str
    object: str
    status: str
    method: str
    base_model: str
    forget_file: str
    retain_file: str | None
    contrast_file: str | None
    init_from_job: str | None
    metadata: dict[str, str]
    chain: list[str]
    worker_class: str | None
    adapter: dict[str, Any]
    hyperparameters: dict[str, Any]
    eval: dict[str, Any] | None
    progress: Progress
    metrics_summary: dict[str, Any] | None
    verdict: str | None
    error: JobError | None
    cancel_requested: bool
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None


class Event(TypedDict):
    id: str
    object: str
    type: str
    message: str
    data: dict[str, Any] | None
    created_at: str


class Artifact(TypedDict):
    name: str
    object: str
    kind: str
    filename: str
    bytes: int
    sha256: str
    created_at: str
    url: NotRequired[str]


def problems_of(file: File, name: str | os.PathLike[str] | None = None) -> list[str]:
    """An invalid file's report as lines a person acts on: `NAME: line N, field F: what`."""
    name = name or file["filename"]
    validation = file["validation"]
    if validation is None:
        return [f"{name}: {file['status']}"]
    lines = []
    for problem in validation["problems"]:
        where = f"line {problem['line']}" if problem["line"] else "the file"
        field = f", field {problem['field']}" if problem["field"] else ""
        lines.append(f"{name}: {where}{field}: {problem['message']}")
    hidden = validation["problems_total"] - len(validation["problems"])
    if hidden > 0:
        lines.append(f"{name}: and {hidden} more problems")
    return lines or [f"{name}: {validation['summary']}"]
