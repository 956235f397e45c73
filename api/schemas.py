"""Response bodies of the v1 API, in the conventions of managed fine-tuning APIs:
objects carry `id` and `object`; lists are `{object: "list", data, has_more, last_id}`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from core.db import Artifact, File, Job, JobEvent, RegisteredModel

T = TypeVar("T")


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-matchable code, e.g. invalid_spec, file_not_found.")
    message: str = Field(description="What went wrong and what to do about it.")
    param: str | None = Field(None, description="The request field concerned, if any.")
    request_id: str | None = Field(None, description="Quote it when reporting a problem.")


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = Field(description="More items after `last_id`: pass it as `after`.")
    last_id: str | None = Field(None, description="Cursor for the next page.")


class ProblemOut(BaseModel):
    line: int | None = Field(description="1-based line number; null for file-level problems.")
    field: str | None
    message: str


class ValidationOut(BaseModel):
    kind: str | None = Field(description="qa | chat | text | mc")
    records: int
    problems: list[ProblemOut] = Field(description="The first 50 problems, in file order.")
    problems_total: int
    summary: str


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    purpose: Literal["forget", "retain", "eval"]
    filename: str
    bytes: int
    sha256: str
    status: Literal["validating", "valid", "invalid"]
    kind: str | None
    records: int | None
    validation: ValidationOut | None = Field(description="The validator's report (null while validating).")
    created_at: datetime

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(id=row.id, purpose=row.purpose, filename=row.filename, bytes=row.bytes,  # type: ignore[arg-type]
                   sha256=row.sha256, status=row.status, kind=row.kind, records=row.records,  # type: ignore[arg-type]
                   validation=ValidationOut(**row.report) if row.report else None,
                   created_at=row.created_at)


class ModelObject(BaseModel):
    id: str = Field(description="The name jobs use as base_model.")
    object: Literal["model"] = "model"
    description: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: RegisteredModel) -> ModelObject:
        return cls(id=row.name, description=row.description, created_at=row.created_at)


class Progress(BaseModel):
    phase: str | None = Field(description="validating, loading, evaluating_before, unlearning, "
                                          "evaluating_after, saving, uploading")
    step: int
    total_steps: int | None
    fraction: float | None = Field(description="step / total_steps")
    loss: float | None
    resumed_from_step: int | None = Field(description="Set when a worker resumed the job from a checkpoint.")


class JobError(BaseModel):
    code: str
    message: str


class JobObject(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "evaluating", "succeeded", "failed", "cancelled"]
    method: str
    base_model: str
    forget_file: str
    retain_file: str | None
    adapter: dict[str, Any]
    hyperparameters: dict[str, Any]
    eval: dict[str, Any] | None
    progress: Progress
    metrics_summary: dict[str, Any] | None = Field(
        description="forget and utility scores before/after and the trade-off (full set: /metrics).")
    error: JobError | None = Field(description="Set when status is failed.")
    cancel_requested: bool
    attempts: int = Field(description="How many times a worker took the job (more than 1 after a resume).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Job) -> JobObject:
        spec = row.spec
        fraction = round(row.step / row.total_steps, 4) if row.total_steps else None
        summary = None
        if row.metrics:
            summary = {k: row.metrics.get(k) for k in ("tradeoff",) if row.metrics.get(k)}
            stop = row.metrics.get("stop_rule")
            if stop:
                summary["stop_rule"] = {k: stop.get(k) for k in ("before", "best", "restored_step", "reason")}
            summary["steps"] = row.metrics.get("steps")
        return cls(
            id=row.id, status=row.status, method=row.method, base_model=row.base_model,  # type: ignore[arg-type]
            forget_file=row.forget_file_id, retain_file=row.retain_file_id,
            adapter=spec.get("adapter") or {}, hyperparameters=spec.get("hyperparameters") or {},
            eval=spec.get("eval"),
            progress=Progress(phase=row.phase, step=row.step, total_steps=row.total_steps,
                              fraction=fraction, loss=row.loss, resumed_from_step=row.resumed_from_step),
            metrics_summary=summary,
            error=JobError(code=row.error_code, message=row.error_message or "")
            if row.error_code else None,
            cancel_requested=row.cancel_requested, attempts=row.attempts,
            created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at)


class EventObject(BaseModel):
    id: str = Field(description="Sequence number, increasing; pass the last one as `after`.")
    object: Literal["job.event"] = "job.event"
    type: Literal["phase", "step", "probe", "status", "message"]
    message: str
    data: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def of(cls, row: JobEvent) -> EventObject:
        return cls(id=str(row.seq), type=row.type, message=row.message, data=row.data,  # type: ignore[arg-type]
                   created_at=row.created_at)


class MetricsObject(BaseModel):
    object: Literal["job.metrics"] = "job.metrics"
    job_id: str
    status: str
    metrics: dict[str, Any] | None = Field(
        description="before, after, tradeoff (delta_f, delta_u, delta_o in points), stop_rule, "
                    "steps, timings_s, and every setting used; null until the job succeeds.")


class ArtifactObject(BaseModel):
    name: str = Field(description="adapter | model | report")
    object: Literal["artifact"] = "artifact"
    kind: str = Field(description="peft_adapter | hf_model | report")
    filename: str
    bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, row: Artifact) -> ArtifactObject:
        return cls(name=row.name, kind=row.kind, filename=row.filename, bytes=row.bytes,
                   sha256=row.sha256, created_at=row.created_at)
