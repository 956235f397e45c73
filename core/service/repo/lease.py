"""A worker's lease on a job: take, renew, find jobs nobody holds, release at the end."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.service.db import Job, utcnow
from core.service.enums import ACTIVE_STATUSES, EventType, JobStatus
from core.service.repo.events import add_event


def acquire_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Take the job if it is active, not cancelled, and nobody holds a live lease.
    One conditional UPDATE, so two deliveries racing for the same job cannot both win."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(ACTIVE_STATUSES),
            Job.cancel_requested.is_(False),
            or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),
        )
        .values(
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            status=JobStatus.RUNNING,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def orphaned_jobs(session: Session, now: datetime | None = None) -> list[Job]:
    """Running jobs whose worker stopped renewing the lease (killed, host lost)."""
    now = now or utcnow()
    return list(
        session.scalars(
            select(Job).where(
                Job.status.in_((JobStatus.RUNNING, JobStatus.EVALUATING)),
                Job.lease_expires_at < now,
            )
        ).all()
    )


def lost_queued_jobs(session: Session, older_than: float, now: datetime | None = None) -> list[Job]:
    """Queued jobs whose id went to the broker long ago and that nobody took: the
    message may be lost (a broker restart without persistence). Also jobs whose id never
    reached the broker (enqueued_at is NULL: the API process died between committing
    the row and sending it) a minute after they were created. Re-sending is safe."""
    now = now or utcnow()
    never_sent = and_(Job.enqueued_at.is_(None), Job.created_at < now - timedelta(seconds=60))
    return list(
        session.scalars(
            select(Job).where(
                Job.status == JobStatus.QUEUED,
                Job.lease_owner.is_(None),
                Job.cancel_requested.is_(False),
                or_(Job.enqueued_at < now - timedelta(seconds=older_than), never_sent),
            )
        ).all()
    )


def finish_job(
    session: Session,
    job: Job,
    status: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    job.status = status
    job.error_code, job.error_message = error_code, error_message
    job.finished_at = utcnow()
    job.lease_owner, job.lease_expires_at = None, None
    add_event(
        session,
        job.id,
        EventType.STATUS,
        f"job {status}" + (f": {error_message}" if error_message else ""),
        {"status": status, **({"error_code": error_code} if error_code else {})},
    )
