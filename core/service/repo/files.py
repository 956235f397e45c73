"""Uploaded files: lookups, locks, usage, validation reports and deletion."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.service import webhooks
from core.service.db import File, Job, JobFile
from core.service.enums import ACTIVE_STATUSES, FileStatus
from core.service.repo.common import metadata_filters, page


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
    filters += metadata_filters(File, metadata)
    return page(session, File, filters, limit, after, "file_not_found")


def files_by_id(session: Session, tenant: str, file_ids: set[str]) -> dict[str, File]:
    """The tenant's files among `file_ids` (tombstones included: a job keeps its inputs)."""
    rows = session.scalars(select(File).where(File.tenant == tenant, File.id.in_(file_ids))).all()
    return {row.id: row for row in rows}


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


def stored_bytes(session: Session, tenant: str) -> int:
    """Bytes of the tenant's uploaded files that are kept (tombstones hold no content)."""
    query = select(func.coalesce(func.sum(File.bytes), 0)).where(
        File.tenant == tenant, File.status != FileStatus.DELETED
    )
    return int(session.scalar(query) or 0)


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
