"""Jobs: idempotent creation, lookups, lists, the files they name and cancellation."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.service.db import Job, JobFile, utcnow
from core.service.enums import ACTIVE_STATUSES, EventType, JobStatus
from core.service.repo.common import metadata_filters, page
from core.service.repo.events import add_event


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def find_idempotent(session: Session, tenant: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))


def get_job(session: Session, tenant: str | None, job_id: str, *, for_update: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"no job {job_id!r}", param="job_id", code="job_not_found")
    return row


def find_job(session: Session, job_id: str) -> Job | None:
    """Any job by id, for the worker (which is not a tenant)."""
    return session.get(Job, job_id)


def list_jobs(
    session: Session,
    tenant: str,
    *,
    status: str | None,
    limit: int,
    after: str | None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    filters = [Job.tenant == tenant] + ([Job.status == status] if status else [])
    filters += metadata_filters(Job, metadata)
    return page(session, Job, filters, limit, after, "job_not_found")


def jobs_by_id(session: Session, tenant: str, job_ids: list[str]) -> dict[str, Job]:
    """The tenant's jobs among `job_ids`."""
    rows = session.scalars(select(Job).where(Job.tenant == tenant, Job.id.in_(job_ids))).all()
    return {row.id: row for row in rows}


def active_jobs(session: Session, tenant: str) -> int:
    query = (
        select(func.count())
        .select_from(Job)
        .where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    )
    return int(session.scalar(query) or 0)


def add_job_files(session: Session, job_id: str, slots: dict[str, str]) -> None:
    session.add_all(
        JobFile(job_id=job_id, slot=slot, file_id=file_id) for slot, file_id in slots.items()
    )


def job_file_slots(session: Session, job_id: str) -> dict[str, str]:
    """slot -> file id of every file the job names."""
    rows = session.execute(select(JobFile.slot, JobFile.file_id).where(JobFile.job_id == job_id))
    return {slot: file_id for slot, file_id in rows}


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def request_cancel(session: Session, tenant: str, job_id: str) -> tuple[Job, bool]:
    """(the job, whether this call changed it). One conditional UPDATE each way, so of
    concurrent cancels exactly one ends a queued job or raises the flag of a running one."""
    now = utcnow()
    ended = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.tenant == tenant,
            Job.status == JobStatus.QUEUED,
            Job.lease_owner.is_(None),
        )
        .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if ended.rowcount == 1:  # type: ignore[attr-defined]
        add_event(
            session, job_id, EventType.STATUS, "job cancelled", {"status": JobStatus.CANCELLED}
        )
        return get_job(session, tenant, job_id), True
    flagged = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.tenant == tenant,
            Job.status.in_(ACTIVE_STATUSES),
            Job.cancel_requested.is_(False),
        )
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if flagged.rowcount == 1:  # type: ignore[attr-defined]
        add_event(
            session, job_id, EventType.MESSAGE, "cancel requested", {"cancel_requested": True}
        )
        return get_job(session, tenant, job_id), True
    return get_job(session, tenant, job_id), False
