"""Every database query the API and the workers make, in one place.

Functions take a Session and do not commit: commits happen at the boundary (the
request dependency, the worker's task wrapper). Every read of a tenant's data is
scoped by tenant; another tenant's ids are simply not found.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import NotFound, SpecError
from core.service import webhooks
from core.service.db import (
    ApiKey,
    Artifact,
    AuditEntry,
    File,
    Job,
    JobEvent,
    JobFile,
    RegisteredModel,
    Tenant,
    looks_like_id,
    new_id,
    utcnow,
)
from core.service.enums import ACTIVE_STATUSES, EventType, FileStatus, JobStatus

KEY_PREFIX = "ul_"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def ping(session: Session) -> None:
    """One round trip to the database (readiness)."""
    session.execute(text("SELECT 1"))


# --- api keys -------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for `tenant`; the plain key is returned once and never stored."""
    if not TENANT_NAME.fullmatch(tenant):
        raise SpecError(
            f"tenant {tenant!r}: use letters, digits and . _ - (at most 100, starting with a "
            "letter or digit)",
            param="tenant",
            code="invalid_tenant",
        )
    lock_tenant(session, tenant)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"), tenant=tenant, key_hash=hash_key(plain), prefix=plain[:10], name=name
    )
    session.add(row)
    return row, plain


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query).all())


def revoke_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}", param="key_id", code="key_not_found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def caller_for_key_hash(session: Session, key_hash: str) -> tuple[str, str, str | None] | None:
    """(tenant, key id, the tenant's rate limit or None for the default) of an active key,
    by the key's hash (`hash_key`)."""
    query = (
        select(ApiKey.tenant, ApiKey.id, Tenant.rate_limit)
        .outerjoin(Tenant, Tenant.id == ApiKey.tenant)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    )
    row = session.execute(query).first()
    return (row[0], row[1], row[2]) if row else None


# --- registered models ----------------------------------------------------------


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")


def add_model(
    session: Session,
    name: str,
    uri: str,
    description: str | None = None,
    *,
    digest: str | None = None,
    reference_for: str | None = None,
    parameters: int | None = None,
    needs_gb: float | None = None,
) -> RegisteredModel:
    """Register (or re-point) a base model. Names are what tenants type: letters, digits
    and ._:/- (at most 200)."""
    if not MODEL_NAME.fullmatch(name):
        raise SpecError(
            f"model name {name!r}: use letters, digits and . _ : / - (at most 200, "
            "starting with a letter or digit)",
            param="name",
            code="invalid_model_name",
        )
    row = session.get(RegisteredModel, name)
    if row is None:
        row = RegisteredModel(name=name, uri=uri, description=description)
        session.add(row)
    row.uri, row.description = uri, description
    row.digest, row.reference_for = digest, reference_for
    row.parameters, row.needs_gb = parameters, needs_gb
    return row


def list_models(
    session: Session, *, limit: int, after: str | None
) -> tuple[list[RegisteredModel], bool]:
    return page(
        session, RegisteredModel, [], limit, after, "model_not_found", key=RegisteredModel.name
    )


def get_model(session: Session, name: str) -> RegisteredModel:
    row = session.get(RegisteredModel, name)
    if row is None:
        names = session.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)).all()
        raise SpecError(
            f"unknown base_model {name!r}; registered models: "
            f"{', '.join(names) or 'none (an operator adds them with `unlearn models add`)'}",
            param="base_model",
            code="unknown_model",
        )
    return row


# --- cursor pagination ----------------------------------------------------------
# Lists are newest first, ordered by (created_at, id); the cursor is the last item's id.
# `after` is the id the previous page ended with, like the managed fine-tuning APIs.


def page(
    session: Session,
    model: Any,
    filters: list[Any],
    limit: int,
    after: str | None,
    not_found: str,
    key: Any = None,
) -> tuple[list[Any], bool]:
    key = key if key is not None else model.id
    query = select(model).where(*filters)
    if after is not None:
        prefix = model.__tablename__.rstrip("s")  # files -> file, jobs -> job
        if key is getattr(model, "id", None) and not looks_like_id(prefix, after):
            raise NotFound(
                f"cursor {after!r} is not an id in this list", param="after", code=not_found
            )
        anchor = session.scalar(select(model).where(*filters, key == after))
        if anchor is None:
            raise NotFound(
                f"cursor {after!r} is not an id in this list", param="after", code=not_found
            )
        anchor_key = getattr(anchor, key.key)
        query = query.where(
            or_(
                model.created_at < anchor.created_at,
                and_(model.created_at == anchor.created_at, key < anchor_key),
            )
        )
    rows = session.scalars(
        query.order_by(model.created_at.desc(), key.desc()).limit(limit + 1)
    ).all()
    return list(rows[:limit]), len(rows) > limit


# --- files ----------------------------------------------------------------------


def get_file(session: Session, tenant: str, file_id: str) -> File:
    row = session.scalar(
        select(File).where(
            File.id == file_id, File.tenant == tenant, File.status != FileStatus.DELETED
        )
    )
    if row is None:
        raise NotFound(f"no file {file_id!r}", param="file_id", code="file_not_found")
    return row


def list_files(
    session: Session,
    tenant: str,
    *,
    purpose: str | None,
    limit: int,
    after: str | None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[File], bool]:
    filters = [File.tenant == tenant, File.status != FileStatus.DELETED]
    filters += [File.purpose == purpose] if purpose else []
    filters += _metadata_filters(File, metadata)
    return page(session, File, filters, limit, after, "file_not_found")


def _metadata_filters(model: Any, metadata: dict[str, str] | None) -> list[Any]:
    """Each metadata[key] == value, on the JSON column (->> on Postgres, json_extract on
    SQLite)."""
    return [model.meta[key].as_string() == value for key, value in (metadata or {}).items()]


def lock_files(session: Session, file_ids: set[str]) -> None:
    """Take the write lock on these files' rows for the rest of the transaction, before
    reading them (a no-op UPDATE: row locks on Postgres, the database's write lock on
    SQLite), so a job naming them and their deletion cannot interleave."""
    if file_ids:
        session.execute(
            update(File)
            .where(File.id.in_(file_ids))
            .values(status=File.status)
            .execution_options(synchronize_session=False)
        )


def file_in_use(session: Session, file_id: str) -> bool:
    """An active job names the file (forget, retain or an eval slot)."""
    query = (
        select(JobFile.job_id)
        .join(Job, Job.id == JobFile.job_id)
        .where(JobFile.file_id == file_id, Job.status.in_(ACTIVE_STATUSES))
        .limit(1)
    )
    return session.scalar(query) is not None


def add_job_files(session: Session, job_id: str, slots: dict[str, str]) -> None:
    session.add_all(
        JobFile(job_id=job_id, slot=slot, file_id=file_id) for slot, file_id in slots.items()
    )


def stored_bytes(session: Session, tenant: str) -> int:
    """Bytes of the tenant's uploaded files that are kept (tombstones hold no content)."""
    query = select(func.coalesce(func.sum(File.bytes), 0)).where(
        File.tenant == tenant, File.status != FileStatus.DELETED
    )
    return int(session.scalar(query) or 0)


# --- jobs -----------------------------------------------------------------------


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
    filters += _metadata_filters(Job, metadata)
    return page(session, Job, filters, limit, after, "job_not_found")


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


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
        ).all()
    )


def get_artifact(session: Session, job_id: str, name: str) -> Artifact:
    row = session.get(Artifact, (job_id, name))
    if row is None:
        names = [a.name for a in list_artifacts(session, job_id)]
        raise NotFound(
            f"job {job_id} has no artifact {name!r}; it has: {', '.join(names) or 'none yet'}",
            param="name",
            code="artifact_not_found",
        )
    return row


# --- the lease ------------------------------------------------------------------


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


def delete_file(session: Session, file: File) -> None:
    """A file some job names (in any slot) becomes a tombstone: its row stays, as the
    evidence of what a job was given; one no job names goes entirely."""
    referenced = session.scalar(select(JobFile.job_id).where(JobFile.file_id == file.id).limit(1))
    if referenced is not None:
        file.status, file.report = FileStatus.DELETED, None
    else:
        session.execute(delete(File).where(File.id == file.id))


def set_file_report(
    session: Session,
    file_id: str,
    status: str,
    kind: str | None,
    records: int | None,
    report: dict[str, Any],
) -> None:
    """Record a background validation's outcome (the file may have been deleted since)."""
    row = session.get(File, file_id)
    if row is not None and row.status == FileStatus.VALIDATING:
        row.status, row.kind, row.records, row.report = status, kind, records, report
        file_validated(session, row)


def file_validated(session: Session, row: File) -> None:
    """Tell the tenant's webhooks (in this transaction) that a file was validated."""
    webhooks.enqueue(
        session,
        row.tenant,
        "file.validated",
        {
            "id": row.id,
            "object": "file",
            "status": row.status,
            "filename": row.filename,
            "purpose": row.purpose,
            "kind": row.kind,
            "records": row.records,
            "summary": (row.report or {}).get("summary"),
            "metadata": row.meta or {},
        },
    )


def files_by_id(session: Session, tenant: str, file_ids: set[str]) -> dict[str, File]:
    """The tenant's files among `file_ids` (tombstones included: a job keeps its inputs)."""
    rows = session.scalars(select(File).where(File.tenant == tenant, File.id.in_(file_ids))).all()
    return {row.id: row for row in rows}


def jobs_by_id(session: Session, tenant: str, job_ids: list[str]) -> dict[str, Job]:
    """The tenant's jobs among `job_ids`."""
    rows = session.scalars(select(Job).where(Job.tenant == tenant, Job.id.in_(job_ids))).all()
    return {row.id: row for row in rows}


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def find_job(session: Session, job_id: str) -> Job | None:
    """Any job by id, for the worker (which is not a tenant)."""
    return session.get(Job, job_id)


def replace_artifacts(session: Session, job_id: str, rows: list[Artifact]) -> None:
    """Store a job's artifact rows, replacing those of an earlier attempt."""
    for row in rows:
        existing = session.get(Artifact, (job_id, row.name))
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(row)


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


# --- tenants --------------------------------------------------------------------


def lock_tenant(session: Session, tenant: str) -> Tenant:
    """The tenant's row, created if missing, with its write lock held for the rest of the
    transaction (a no-op UPDATE first: row lock on Postgres, the database's write lock on
    SQLite), so checks of its limits and the inserts they guard cannot interleave."""
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    row = session.get(Tenant, tenant, populate_existing=True)
    if row is None:
        row = Tenant(id=tenant)
        session.add(row)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:  # created by a concurrent request: lock the one it made
            return lock_tenant(session, tenant)
    return row


def get_tenant(session: Session, tenant: str) -> Tenant | None:
    return session.get(Tenant, tenant)


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.id)).all())


def active_jobs(session: Session, tenant: str) -> int:
    query = (
        select(func.count())
        .select_from(Job)
        .where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    )
    return int(session.scalar(query) or 0)


def job_file_slots(session: Session, job_id: str) -> dict[str, str]:
    """slot -> file id of every file the job names."""
    rows = session.execute(select(JobFile.slot, JobFile.file_id).where(JobFile.job_id == job_id))
    return {slot: file_id for slot, file_id in rows}


def find_model(session: Session, name: str) -> RegisteredModel | None:
    return session.get(RegisteredModel, name)


def reference_for(session: Session, base_model: str) -> RegisteredModel | None:
    """The model an operator registered as the reference for `base_model`, if any."""
    query = select(RegisteredModel).where(RegisteredModel.reference_for == base_model)
    return session.scalars(query.order_by(RegisteredModel.created_at.desc()).limit(1)).first()


def list_audit(
    session: Session, tenant: str, *, limit: int, after: int | None
) -> tuple[list[AuditEntry], bool]:
    """The tenant's audit entries, oldest first; `after` is the last number seen."""
    query = select(AuditEntry).where(AuditEntry.tenant == tenant)
    if after is not None:
        query = query.where(AuditEntry.number > after)
    rows = session.scalars(query.order_by(AuditEntry.number).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit
