"""A job's numbered event log, and the webhooks its status events send."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from core.service import webhooks
from core.service.db import Job, JobEvent, utcnow
from core.service.enums import EventType


def add_event(
    session: Session, job_id: str, type_: str, message: str, data: dict[str, Any] | None = None
) -> None:
    """Append an event numbered 1, 2, 3... within its job. The job's row is locked first
    (a no-op UPDATE), so two writers of one job's events take turns and the next number
    is read after the last one was committed."""
    session.flush()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(updated_at=Job.updated_at)
        .execution_options(synchronize_session=False)
    )
    next_number = (
        select(func.coalesce(func.max(JobEvent.number), 0) + 1)
        .where(JobEvent.job_id == job_id)
        .scalar_subquery()
    )
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            number=next_number,
            type=type_,
            message=message,
            data=data,
            created_at=utcnow(),
        )
    )
    status = (data or {}).get("status")
    if type_ == EventType.STATUS and f"job.{status}" in webhooks.EVENT_TYPES:
        job = session.get(Job, job_id)
        if job is not None:  # tell the tenant's webhooks, in the same transaction
            webhooks.enqueue(session, job.tenant, f"job.{status}", _job_payload(job, data))


def _job_payload(job: Job, data: dict[str, Any] | None) -> dict[str, Any]:
    error = None
    if job.error_code or (data or {}).get("error_code"):
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": job.id,
        "object": "job",
        "status": (data or {}).get("status", job.status),
        "method": job.method,
        "base_model": job.base_model,
        "metadata": job.meta or {},
        "error": error,
        "verdict": (job.metrics or {}).get("verdict"),
    }


def list_events(
    session: Session, job_id: str, *, limit: int, after: int | None
) -> tuple[list[JobEvent], bool]:
    """Events oldest first (a log to follow); `after` is the last event number seen."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.number > after)
    rows = session.scalars(query.order_by(JobEvent.number).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


def last_event_number(session: Session, job_id: str) -> int:
    """The number of the job's last event (0 before any)."""
    number = session.scalar(select(func.max(JobEvent.number)).where(JobEvent.job_id == job_id))
    return number or 0
