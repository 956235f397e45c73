"""Files: upload (streamed to disk, hashed, validated, stored), background validation of
large uploads, deletion with tombstones. Routes call these; queries are core.service.repo's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from core.engine.formats import Problem, ValidationReport, validate_file
from core.errors import Conflict, LimitExceeded, UnlearnError
from core.service import audit, repo
from core.service.audit import Who
from core.service.db import File, new_id
from core.service.enums import PURPOSE_KINDS, FileStatus, Purpose
from core.service.quotas import limits_for
from core.service.settings import Settings
from core.service.storage import Store, TooLarge, spool

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass
class Uploaded:
    """A stored upload, and the validation still to run when it was too large to validate
    before answering (the route runs it after the response)."""

    row: File
    validate_later: Callable[[], None] | None


def upload(
    session: Session,
    sessions: sessionmaker,
    store: Store,
    settings: Settings,
    who: Who,
    stream: BinaryIO,
    filename: str | None,
    purpose: Purpose,
    metadata: dict[str, str] | None = None,
) -> Uploaded:
    """Spool the upload to disk while hashing it (TooLarge past MAX_UPLOAD_BYTES), validate
    it now or later, put it in the store, then commit its row: the row exists only once
    the object does, and the object is removed again if the row cannot be committed."""
    tenant = who.tenant
    name = _safe_name(filename)
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise UnlearnError(
            f"{name}: unsupported file type {suffix or '(none)'}; "
            f"upload one of {', '.join(SUFFIXES)}",
            param="file",
            code="unsupported_file_type",
        )
    try:
        spooled = spool(
            stream, settings.work_dir / "uploads", settings.max_upload_bytes, suffix=suffix
        )
    except TooLarge:
        raise UnlearnError(
            f"{name} is larger than the limit of {settings.max_upload_bytes} "
            "bytes (MAX_UPLOAD_BYTES)",
            param="file",
            code="file_too_large",
        ) from None
    try:
        # A first check before the object is stored; the one that counts runs under the
        # tenant's lock, with the row's insert.
        _check_quota(session, settings, tenant, spooled.bytes)
        session.rollback()  # ends the read; the lock is taken right before the insert
    except BaseException:
        spooled.path.unlink(missing_ok=True)
        raise
    file_id = new_id("file")
    key = f"files/{tenant}/{file_id}{suffix}"
    row = File(
        id=file_id,
        tenant=tenant,
        purpose=purpose,
        filename=name,
        bytes=spooled.bytes,
        sha256=spooled.sha256,
        status=FileStatus.VALIDATING,
        storage_key=key,
        meta=metadata or None,
    )
    later = spooled.bytes > settings.validate_inline_bytes
    try:
        if not later:
            _apply(row, validation_report(settings, spooled.path, purpose, name))
        store.put(key, spooled.path)
        try:
            _check_quota(session, settings, tenant, spooled.bytes)
            session.add(row)
            if not later:
                repo.file_validated(session, row)
            audit.record(
                session,
                who,
                "file.uploaded",
                file_id,
                {
                    "filename": name,
                    "purpose": purpose,
                    "bytes": spooled.bytes,
                    "sha256": spooled.sha256,
                },
            )
            session.commit()
        except BaseException:
            store.delete(key)
            raise
    except BaseException:
        spooled.path.unlink(missing_ok=True)
        raise
    if not later:
        spooled.path.unlink(missing_ok=True)
        return Uploaded(row, None)
    return Uploaded(
        row, lambda: _validate_later(sessions, settings, file_id, spooled.path, purpose, name)
    )


def delete(session: Session, store: Store, who: Who, file: File) -> None:
    """Delete a file's content. A row that jobs name (in any slot) stays as a tombstone
    (id, name, sha256: the evidence of what a job was given), hidden from the files API.
    The row is locked first, so a job naming it is either committed before (then the
    file is in use, 409) or sees it gone. The content goes only once that is committed."""
    repo.lock_tenant(session, who.tenant)  # locks in the order job creation takes them
    repo.lock_files(session, {file.id})
    if repo.file_in_use(session, file.id):
        raise Conflict(
            f"file {file.id} is used by a queued or running job; cancel the job first",
            param="file_id",
            code="file_in_use",
        )
    repo.delete_file(session, file)
    audit.record(session, who, "file.deleted", file.id, {"sha256": file.sha256})
    session.commit()
    store.delete(file.storage_key)


def _safe_name(filename: str | None) -> str:
    """The upload's base name, as text: no control characters, NUL or lone surrogates
    (which no database stores), at most 200 characters."""
    name = "".join(ch for ch in Path(filename or "").name if ch.isprintable())[-200:].strip()
    return name or "upload.jsonl"


def _check_quota(session: Session, settings: Settings, tenant: str, size: int) -> None:
    """413 when the tenant's stored files and this upload together pass its limit. Takes
    the tenant's row lock, so concurrent uploads are counted one after the other."""
    limits = limits_for(settings, repo.lock_tenant(session, tenant))
    stored = repo.stored_bytes(session, tenant)
    if stored + size > limits.max_stored_bytes:
        raise LimitExceeded(
            f"tenant {tenant!r} stores {stored:,} bytes of files; this upload of {size:,} would pass "
            f"its limit of {limits.max_stored_bytes:,}: delete files it no longer needs, or ask the "
            "operator to raise the limit (MAX_STORED_BYTES, or `unlearn tenants set`)",
            param="file",
            code="storage_quota_exceeded",
            status=413,
        )


def validation_report(
    settings: Settings, path: Path, purpose: Purpose, filename: str
) -> dict[str, Any]:
    """The validation report as stored on the file row. A validator that breaks (a bug)
    makes the file invalid with a file-level problem saying so: never a 500, and never
    a file left in `validating` by a background validation that died."""
    try:
        report = validate_file(
            path,
            max_bytes=settings.max_upload_bytes,
            max_record_chars=settings.max_record_chars,
            allowed_kinds=PURPOSE_KINDS[purpose],
        )
    except Exception as exc:  # a validator fault is reported on the file
        log.exception("validating %s failed", filename)
        problem = Problem(
            line=None,
            field=None,
            message=f"could not be validated ({type(exc).__name__}); this is a fault of "
            "the service, not known to be one of the file: report it to the operator",
        )
        report = ValidationReport(
            valid=False, kind=None, records=0, problems=[problem], problems_total=1
        )
    return {
        "valid": report.valid,
        "kind": report.kind,
        "records": report.records,
        "problems": [p.model_dump() for p in report.problems],
        "problems_total": report.problems_total,
        "summary": report.summary(filename),
    }


def _apply(row: File, report: dict[str, Any]) -> None:
    row.status = FileStatus.VALID if report.pop("valid") else FileStatus.INVALID
    row.kind, row.records, row.report = report["kind"], report["records"], report


def _validate_later(
    sessions: sessionmaker,
    settings: Settings,
    file_id: str,
    path: Path,
    purpose: Purpose,
    filename: str,
) -> None:
    """Background validation for large uploads: validating -> valid | invalid."""
    try:
        report = validation_report(settings, path, purpose, filename)
        status = FileStatus.VALID if report.pop("valid") else FileStatus.INVALID
        with sessions.begin() as session:
            repo.set_file_report(
                session, file_id, status, report["kind"], report["records"], report
            )
    finally:
        path.unlink(missing_ok=True)
