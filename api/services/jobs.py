"""Jobs: creation (validated by the engine's registry, every file checked, the row
committed, then its id enqueued), cancellation, and what a download may serve."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.queue import TaskQueue
from core.engine.spec import JobSpec, parse_spec
from core.errors import Conflict, SpecError, Unavailable, UnlearnError
from core.service import repo
from core.service.db import Artifact, Job, new_id, utcnow
from core.service.enums import (
    ACTIVE_STATUSES,
    FILE_SLOTS,
    TERMINAL_STATUSES,
    EventType,
    FileStatus,
    JobStatus,
)

log = logging.getLogger(__name__)


def create(
    session: Session,
    queue: TaskQueue,
    tenant: str,
    body: dict[str, Any],
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """(the job, whether it was created now). A retry with the same Idempotency-Key and
    body returns the job the first request created; another body with it is refused.

    The row is committed before its id goes to the broker (a worker must find it), so
    this is the one request that commits before it ends; if the broker does not take the
    id, the row is removed again and nothing was created."""
    digest = repo.request_hash(body)
    if idempotency_key:
        existing = repo.find_idempotent(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    spec = parse_spec(body)
    repo.get_model(session, spec.base_model)
    _check_files(session, tenant, spec)
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.QUEUED,
        method=spec.method,
        base_model=spec.base_model,
        forget_file_id=spec.forget_file,
        retain_file_id=spec.retain_file,
        spec=spec.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_hash=digest,
        step=0,
        attempts=0,
        cancel_requested=False,
        enqueued_at=utcnow(),
    )
    session.add(job)
    repo.add_event(session, job.id, EventType.STATUS, "job queued", {"status": JobStatus.QUEUED})
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # a concurrent retry with the same Idempotency-Key won the race
        existing = repo.find_idempotent(session, tenant, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest), False
    try:
        queue.send(job.id)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        session.delete(job)
        session.commit()
        raise Unavailable(
            "the job queue is unavailable; nothing was created, retry shortly",
            code="queue_unavailable",
        ) from exc
    log.info("job %s created for tenant %s (%s)", job.id, tenant, spec.method)
    return job, True


def cancel(session: Session, tenant: str, job_id: str) -> Job:
    """A queued job nobody took ends cancelled at once; a running one gets the flag its
    loop checks before every step."""
    job = repo.get_job(session, tenant, job_id, for_update=True)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(
            f"job {job.id} already {job.status}; nothing to cancel",
            param="job_id",
            code="job_not_cancellable",
        )
    if job.status == JobStatus.QUEUED and job.lease_owner is None:
        repo.finish_job(session, job, JobStatus.CANCELLED)
    elif not job.cancel_requested:
        job.cancel_requested = True
        repo.add_event(
            session, job.id, EventType.MESSAGE, "cancel requested", {"cancel_requested": True}
        )
    return job


def downloadable(session: Session, job: Job, name: str) -> Artifact:
    """The artifact `name` of a finished job."""
    if job.status in ACTIVE_STATUSES:
        raise Conflict(
            f"job {job.id} is {job.status}; artifacts exist once it has succeeded",
            param="job_id",
            code="job_not_finished",
        )
    return repo.get_artifact(session, job.id, name)


def _replay(existing: Job, digest: str) -> Job:
    if existing.request_hash != digest:
        raise SpecError(
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new job",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return existing


def _check_files(session: Session, tenant: str, spec: JobSpec) -> None:
    """Every file the job names must be the tenant's, valid, of the right purpose and kind."""
    values = {"forget_file": spec.forget_file, "retain_file": spec.retain_file}
    if spec.eval is not None:
        values.update({f"eval.{k}": v for k, v in spec.eval.files().items()})
    for slot, file_id in values.items():
        if not file_id:
            continue
        purpose, kinds = FILE_SLOTS[slot]
        try:
            row = repo.get_file(session, tenant, file_id)
        except UnlearnError:
            raise SpecError(
                f"{slot}: no file {file_id!r} (upload it with POST /v1/files)",
                param=slot,
                code="file_not_found",
            ) from None
        if row.purpose != purpose:
            raise SpecError(
                f"{slot}: file {file_id} was uploaded with purpose {row.purpose!r}; "
                f"this slot needs purpose {purpose.value!r}",
                param=slot,
                code="wrong_file_purpose",
            )
        if row.status != FileStatus.VALID:
            detail = (row.report or {}).get("summary") or "it is still being validated"
            raise SpecError(
                f"{slot}: file {file_id} is {row.status}: {detail}",
                param=slot,
                code="file_not_valid",
            )
        if row.kind not in kinds:
            raise SpecError(
                f"{slot}: file {file_id} holds {row.kind} records; this slot needs "
                f"{' or '.join(kinds)}",
                param=slot,
                code="wrong_file_kind",
            )
