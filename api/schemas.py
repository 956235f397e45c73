"""Response bodies of the v1 API, in the conventions of managed fine-tuning APIs:
objects carry `id` and `object`; lists are `{object: "list", data, has_more, last_id}`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from core.service.db import (
    Artifact,
    AuditEntry,
    File,
    Job,
    JobEvent,
    RegisteredModel,
    SigningKey,
    Webhook,
    WebhookDelivery,
)
from core.service.enums import TERMINAL_STATUSES, EventType, FileStatus, JobStatus, Purpose

T = TypeVar("T")


class ErrorBody(BaseModel):
    code: str = Field(
        description="Stable, machine-matchable code, e.g. invalid_spec, file_not_found."
    )
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

    @classmethod
    def page(
        cls, items: list[Any], has_more: bool, *, empty_cursor: str | None = None
    ) -> ListResponse:
        """A page of API objects; the cursor is the last one's id."""
        return cls(data=items, has_more=has_more, last_id=items[-1].id if items else empty_cursor)


class ProblemOut(BaseModel):
    line: int | None = Field(description="1-based line number; null for file-level problems.")
    field: str | None = Field(description="The record field concerned (e.g. response), if any.")
    message: str = Field(description="What is wrong with that line or field.")


class ValidationOut(BaseModel):
    kind: str | None = Field(description="qa | chat | text | mc")
    records: int = Field(description="Records that passed validation.")
    problems: list[ProblemOut] = Field(description="The first 50 problems, in file order.")
    problems_total: int = Field(description="All problems found, listed or not.")
    summary: str = Field(description="One line for people: valid, or the first problems.")


class FileObject(BaseModel):
    id: str = Field(
        description="file-..., what jobs name in forget_file, retain_file, contrast_file, eval.*"
    )
    object: Literal["file"] = "file"
    purpose: Purpose = Field(description="What the file may be used for.")
    filename: str = Field(description="The uploaded file's name.")
    bytes: int = Field(description="Size as received.")
    sha256: str = Field(description="SHA-256 of the content as received.")
    status: Literal[FileStatus.VALIDATING, FileStatus.VALID, FileStatus.INVALID] = Field(
        description="validating (large files, in the background) -> valid | invalid"
    )
    kind: str | None = Field(description="qa | chat | text | mc, detected from the first record.")
    records: int | None = Field(description="Valid records.")
    validation: ValidationOut | None = Field(
        description="The validator's report (null while validating)."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Your map of strings, as uploaded."
    )
    created_at: datetime = Field(description="Upload time, UTC.")

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            purpose=row.purpose,
            filename=row.filename,
            bytes=row.bytes,
            sha256=row.sha256,
            status=row.status,
            kind=row.kind,
            records=row.records,
            validation=ValidationOut(**row.report) if row.report else None,
            metadata=dict(row.meta or {}),
            created_at=row.created_at,
        )


class FileDeleted(BaseModel):
    id: str = Field(description="The deleted file's id.")
    object: Literal["file"] = "file"
    deleted: Literal[True] = Field(True, description="Always true: the content is gone.")


class ModelObject(BaseModel):
    id: str = Field(description="The name jobs use as base_model.")
    object: Literal["model"] = "model"
    description: str | None = Field(description="What the operator said of it.")
    created_at: datetime = Field(description="Registration time, UTC.")

    @classmethod
    def of(cls, row: RegisteredModel) -> ModelObject:
        return cls(id=row.name, description=row.description, created_at=row.created_at)


class MethodObject(BaseModel):
    id: str = Field(description="The id a job names as method.")
    object: Literal["method"] = "method"
    summary: str = Field(description="What it does, with the paper's reference.")
    data: str = Field(description="What it trains on: forget, forget + retain, ...")
    needs_retain: bool = Field(description="A retain_file is required.")
    uses_contrast: bool = Field(description="A contrast_file is used (optional).")
    hyperparameters: dict[str, Any] = Field(
        description="JSON Schema of its hyperparameters, with defaults and bounds."
    )

    @classmethod
    def of(cls, method: Any) -> MethodObject:
        return cls(
            id=method.id,
            summary=method.summary,
            data=method.data,
            needs_retain=method.needs_retain,
            uses_contrast=method.uses_contrast,
            hyperparameters=method.params.model_json_schema(),
        )


class Progress(BaseModel):
    phase: str | None = Field(
        description="validating, loading, evaluating_before, unlearning, "
        "evaluating_after, auditing, saving, uploading; null once the job has a final status"
    )
    step: int = Field(description="Optimizer steps done.")
    total_steps: int | None = Field(description="Steps planned (the stop rule may end sooner).")
    fraction: float | None = Field(description="step / total_steps")
    loss: float | None = Field(description="Loss of the last reported step.")
    resumed_from_step: int | None = Field(
        description="Set when a worker resumed the job from a checkpoint."
    )


class JobError(BaseModel):
    code: str = Field(
        description="Stable code: invalid_file, model_unavailable, out_of_memory, ..."
    )
    message: str = Field(description="What failed and what to change.")


class JobObject(BaseModel):
    id: str = Field(description="job-...")
    object: Literal["job"] = "job"
    status: JobStatus = Field(
        description="queued -> running -> evaluating -> succeeded | failed | cancelled"
    )
    method: str = Field(description="The unlearning method id.")
    base_model: str = Field(description="The registered base model.")
    forget_file: str = Field(description="The forget set's file id.")
    retain_file: str | None = Field(description="The retain set's file id, if any.")
    contrast_file: str | None = Field(
        None, description="flat: the contrast set's file id, if any (else built-in refusals)."
    )
    init_from_job: str | None = Field(
        None, description="Sequential unlearning: the job whose output this one started from."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Your map of strings, as submitted."
    )
    chain: list[str] = Field(
        default_factory=list,
        description="The jobs before this one in its chain, first job first (init_from_job "
        "last); empty for a job on the base model.",
    )
    adapter: dict[str, Any] = Field(description="The adapter spec with defaults filled in.")
    hyperparameters: dict[str, Any] = Field(description="All hyperparameters, defaults filled in.")
    eval: dict[str, Any] | None = Field(description="Eval file ids and stop-rule settings.")
    progress: Progress = Field(description="Phase and steps, updated while the job runs.")
    metrics_summary: dict[str, Any] | None = Field(
        description="The forget metric that still shows the most knowledge (`forget_standing`: "
        "every forget metric against its before figure and the reference's), the trade-off "
        "of the forget and utility scores, the stop rule, steps and verdict (full set: /metrics)."
    )
    verdict: str | None = Field(
        description="The evidence's verdict on the criteria of eval.criteria: pass | fail | "
        "not_evaluated; null until the job has succeeded. A succeeded job may fail its "
        "criteria: `succeeded` says the job ran, `verdict` what its evidence shows."
    )
    error: JobError | None = Field(description="Set when status is failed.")
    worker_class: str | None = Field(
        description="The class of worker it is routed to (WORKER_CLASSES); null: one queue."
    )
    cancel_requested: bool = Field(
        description="A cancel was asked for; the loop stops at its next step."
    )
    attempts: int = Field(
        description="How many times a worker took the job (more than 1 after a resume)."
    )
    created_at: datetime = Field(description="Submission time, UTC.")
    started_at: datetime | None = Field(description="When a worker first took it.")
    finished_at: datetime | None = Field(description="When it reached a final status.")

    @classmethod
    def of(cls, row: Job) -> JobObject:
        spec = row.spec
        fraction = round(row.step / row.total_steps, 4) if row.total_steps else None
        summary = None
        if row.metrics:
            from core.engine.evaluation.summary import forget_standing

            summary = {"forget_standing": forget_standing(row.metrics)}
            if row.metrics.get("tradeoff"):
                summary["tradeoff"] = row.metrics["tradeoff"]
            stop = row.metrics.get("stop_rule")
            if stop:
                summary["stop_rule"] = {
                    k: stop.get(k) for k in ("before", "best", "restored_step", "reason")
                }
            summary["steps"] = row.metrics.get("steps")
            summary["verdict"] = row.metrics.get("verdict")
        return cls(
            id=row.id,
            status=row.status,
            method=row.method,
            base_model=row.base_model,
            forget_file=row.forget_file_id,
            retain_file=row.retain_file_id,
            contrast_file=spec.get("contrast_file"),
            init_from_job=row.init_from_job_id,
            metadata=dict(row.meta or {}),
            chain=list(row.chain or []),
            adapter=spec.get("adapter") or {},
            hyperparameters=spec.get("hyperparameters") or {},
            eval=spec.get("eval"),
            progress=Progress(
                phase=None if row.status in TERMINAL_STATUSES else row.phase,
                step=row.step,
                total_steps=row.total_steps,
                fraction=fraction,
                loss=row.loss,
                resumed_from_step=row.resumed_from_step,
            ),
            metrics_summary=summary,
            verdict=(row.metrics or {}).get("verdict") if row.status == "succeeded" else None,
            error=JobError(code=row.error_code, message=row.error_message or "")
            if row.error_code
            else None,
            worker_class=row.worker_class,
            cancel_requested=row.cancel_requested,
            attempts=row.attempts,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class EventObject(BaseModel):
    id: str = Field(description="Sequence number, increasing; pass the last one as `after`.")
    object: Literal["job.event"] = "job.event"
    type: EventType = Field(
        description="phase change, step loss (throttled), stop-rule probe, status change, a note, "
        "or a warning (e.g. forget records that max_length cut or left out)"
    )
    message: str = Field(description="One line for people.")
    data: dict[str, Any] | None = Field(
        description="The same, structured (step, loss, terms, lr, ...)."
    )
    created_at: datetime = Field(description="UTC.")

    @classmethod
    def of(cls, row: JobEvent) -> EventObject:
        return cls(
            id=str(row.number),
            type=row.type,
            message=row.message,
            data=row.data,
            created_at=row.created_at,
        )


class SummaryRow(BaseModel):
    metric: str = Field(description="What was measured, and which way is better.")
    before: str = Field(description="Before unlearning, in points (perplexity as is).")
    after: str = Field(description="After unlearning.")
    reference: str = Field(description="A model that never saw the forget set; empty if none.")


class MetricsSummary(BaseModel):
    headline: str | None = Field(
        None,
        description="The forget metric that still shows the most knowledge, against before "
        'and the reference model (docs/evaluation.md, "The headline"); null without one.',
    )
    rows: list[SummaryRow] = Field(description="The before/after table, as the report has it.")
    evidence: list[str] = Field(
        description="One line per audit (attacks, membership inference) and the verdict."
    )


class MetricsObject(BaseModel):
    object: Literal["job.metrics"] = "job.metrics"
    job_id: str = Field(description="The job.")
    status: str = Field(description="The job's status.")
    metrics: dict[str, Any] | None = Field(
        description="before, after, tradeoff (delta_f, delta_u, delta_o in points), stop_rule, "
        "steps, timings_s, and every setting used; null until the job succeeds."
    )
    summary: MetricsSummary | None = Field(
        None, description="The metrics for people, in the report's words; null without metrics."
    )

    @classmethod
    def of(cls, job: Job) -> MetricsObject:
        from core.engine.evaluation.summary import before_after_rows, evidence_lines, headline

        summary = None
        if job.metrics:
            summary = MetricsSummary(
                headline=headline(job.metrics),
                rows=[
                    SummaryRow(metric=m, before=b, after=a, reference=r)
                    for m, b, a, r in before_after_rows(job.metrics)
                ],
                evidence=evidence_lines(job.metrics),
            )
        return cls(job_id=job.id, status=job.status, metrics=job.metrics, summary=summary)


class ArtifactObject(BaseModel):
    name: str = Field(description="adapter | model | report")
    object: Literal["artifact"] = "artifact"
    kind: str = Field(description="peft_adapter | hf_model | report")
    filename: str = Field(description="Name of the download: .tar.gz, or .tar for weights.")
    bytes: int = Field(description="Size of the archive.")
    sha256: str = Field(description="SHA-256 of the archive: check it after download.")
    created_at: datetime = Field(description="UTC.")

    @property
    def id(self) -> str:
        return self.name

    @classmethod
    def of(cls, row: Artifact) -> ArtifactObject:
        return cls(
            name=row.name,
            kind=row.kind,
            filename=row.filename,
            bytes=row.bytes,
            sha256=row.sha256,
            created_at=row.created_at,
        )


class SigningKeyObject(BaseModel):
    id: str = Field(description="The key id a certificate's signature names.")
    object: Literal["signing_key"] = "signing_key"
    algorithm: Literal["Ed25519", "ECDSA-P256"] = Field(
        "Ed25519",
        description="Ed25519 signs certificates (DSSE envelopes); ECDSA-P256 signs output "
        "model directories (OpenSSF model signing, `model.sig`).",
    )
    public_key_pem: str = Field(description="The public key, PEM (SubjectPublicKeyInfo).")
    created_at: datetime = Field(description="UTC.")

    @classmethod
    def of(cls, row: SigningKey) -> SigningKeyObject:
        algorithm = "ECDSA-P256" if row.id.startswith("ecdsa-p256-") else "Ed25519"
        return cls(
            id=row.id,
            algorithm=algorithm,
            public_key_pem=row.public_key_pem,
            created_at=row.created_at,
        )


class AuditEntryObject(BaseModel):
    id: str = Field(description="The entry's number in the tenant's chain: 1, 2, 3...")
    object: Literal["audit.entry"] = "audit.entry"
    number: int = Field(description="Its place in the chain.")
    at: datetime = Field(description="UTC.")
    actor: str = Field(description="The API key id that acted, `operator` or `worker`.")
    action: str = Field(description="job.created, job.succeeded, file.uploaded, ...")
    subject: str = Field(description="The job, file, key or model it concerns.")
    request_id: str | None = Field(description="The API request, where there was one.")
    data: dict[str, Any] | None = Field(description="Details of the action.")
    prev_hash: str = Field(description="sha256 of the entry before (64 zeros for the first).")
    hash: str = Field(description="sha256 of this entry (core.service.audit.entry_hash).")

    @classmethod
    def of(cls, row: AuditEntry) -> AuditEntryObject:
        return cls(
            id=str(row.number),
            number=row.number,
            at=row.at,
            actor=row.actor,
            action=row.action,
            subject=row.subject,
            request_id=row.request_id,
            data=row.data,
            prev_hash=row.prev_hash,
            hash=row.hash,
        )


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://hooks.example.com/unlearn",
                    "event_types": ["job.succeeded", "job.failed"],
                    "description": "compliance tooling",
                }
            ]
        },
    )

    url: str = Field(
        min_length=1,
        max_length=2000,
        description="Where deliveries are POSTed: https (or http), a public address unless "
        "the operator allows private ones.",
    )
    event_types: list[str] = Field(
        min_length=1,
        max_length=20,
        description="What to send: job.running, job.succeeded, job.failed, job.cancelled, "
        "file.validated.",
    )
    description: str | None = Field(None, max_length=500, description="Your label for it.")


class WebhookObject(BaseModel):
    id: str = Field(description="webhook-...")
    object: Literal["webhook"] = "webhook"
    url: str = Field(description="Where deliveries go.")
    event_types: list[str] = Field(description="What is sent there.")
    description: str | None = Field(description="Your label for it.")
    secret: str | None = Field(
        None,
        description="The signing secret (whsec_...), shown once, in the answer that creates "
        "the webhook: verify each delivery's webhook-signature with it.",
    )
    created_at: datetime = Field(description="UTC.")

    @classmethod
    def of(cls, row: Webhook, *, secret: bool = False) -> WebhookObject:
        return cls(
            id=row.id,
            url=row.url,
            event_types=row.event_types,
            description=row.description,
            secret=row.secret if secret else None,
            created_at=row.created_at,
        )


class WebhookDeleted(BaseModel):
    id: str = Field(description="The deleted webhook's id.")
    object: Literal["webhook"] = "webhook"
    deleted: Literal[True] = Field(True, description="Always true: nothing more is sent.")


class DeliveryAttempt(BaseModel):
    at: str = Field(description="When it was tried, UTC (ISO 8601).")
    status_code: int | None = Field(description="The endpoint's answer; null if none came.")
    error: str | None = Field(description="Why it counts as failed; null when delivered.")
    ms: int = Field(description="How long the attempt took.")


class DeliveryObject(BaseModel):
    id: str = Field(description="msg-...: the webhook-id header (the same on every retry).")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str = Field(description="The webhook it goes to.")
    event_type: str = Field(description="job.succeeded, file.validated, ...")
    status: Literal["pending", "succeeded", "failed"] = Field(
        description="pending (to be tried, or retried at next_attempt_at), succeeded, or "
        "failed (the retry schedule ran out)."
    )
    attempts: list[DeliveryAttempt] = Field(description="Every attempt, oldest first.")
    next_attempt_at: datetime | None = Field(description="When it is tried next (pending).")
    payload: dict[str, Any] = Field(description="The body sent: {type, timestamp, data}.")
    created_at: datetime = Field(description="UTC.")
    delivered_at: datetime | None = Field(description="When the endpoint took it.")

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryObject:
        return cls(
            id=row.id,
            webhook_id=row.webhook_id,
            event_type=row.event_type,
            status=row.status,
            attempts=[DeliveryAttempt(**a) for a in row.attempt_log],
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            payload=row.payload,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )
