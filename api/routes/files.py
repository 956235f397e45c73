"""/v1/files: upload (multipart, streamed to disk, hashed, validated), list, get, delete."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Form, Query, Request, UploadFile, status
from fastapi import File as FormFile
from sqlalchemy.orm import sessionmaker

from api.deps import FileDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import FileObject, ListResponse
from core import repo
from core.db import File, new_id
from core.errors import Conflict, UnlearnError
from core.formats import Problem, ValidationReport, validate_file
from core.settings import Settings
from core.storage import TooLarge, spool

log = logging.getLogger(__name__)

# What each purpose may hold: forget/retain sets train; eval files also hold MC sets.
ALLOWED_KINDS = {"forget": ("qa", "chat", "text"), "retain": ("qa", "chat", "text"),
                 "eval": ("qa", "chat", "text", "mc")}
SUFFIXES = (".jsonl", ".json", ".txt")


def _report(settings: Settings, path: Path, purpose: str, filename: str) -> dict:
    """The validation report as stored on the file row. A validator that breaks (a bug)
    makes the file invalid with a file-level problem saying so: never a 500, and never
    a file left in `validating` by a background validation that died."""
    try:
        report = validate_file(path, max_bytes=settings.max_upload_bytes,
                               max_record_chars=settings.max_record_chars,
                               allowed_kinds=ALLOWED_KINDS[purpose])  # type: ignore[arg-type]
    except Exception as exc:
        log.exception("validating %s failed", filename)
        problem = Problem(line=None, field=None,
                          message=f"could not be validated ({type(exc).__name__}); this is a fault of "
                                  "the service, not known to be one of the file: report it to the operator")
        report = ValidationReport(valid=False, kind=None, records=0, problems=[problem], problems_total=1)
    return {"valid": report.valid, "kind": report.kind, "records": report.records,
            "problems": [p.model_dump() for p in report.problems],
            "problems_total": report.problems_total, "summary": report.summary(filename)}


def _apply(row: File, report: dict) -> None:
    row.status = "valid" if report.pop("valid") else "invalid"
    row.kind, row.records, row.report = report["kind"], report["records"], report


def _validate_later(sessions: sessionmaker, settings: Settings, file_id: str, path: Path,
                    purpose: str, filename: str) -> None:
    """Background validation for large uploads: validating -> valid | invalid."""
    try:
        report = _report(settings, path, purpose, filename)
        with sessions.begin() as session:
            row = session.get(File, file_id)
            if row is not None:
                _apply(row, report)
    finally:
        path.unlink(missing_ok=True)


def build(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1/files", tags=["files"])
    @router.post("", status_code=status.HTTP_201_CREATED, response_model=FileObject,
                 summary="Upload a forget, retain or eval file (JSONL or .txt)")
    def upload(request: Request, session: SessionDep, tenant: TenantDep, store: StoreDep,
               settings: SettingsDep, background: BackgroundTasks,
               file: Annotated[UploadFile, FormFile(description="JSONL (qa, chat, text, mc) or .txt")],
               purpose: Annotated[Literal["forget", "retain", "eval"], Form()]) -> FileObject:
        filename = Path(file.filename or "upload.jsonl").name[:500]
        suffix = Path(filename).suffix.lower()
        if suffix not in SUFFIXES:
            raise UnlearnError(f"{filename}: unsupported file type {suffix or '(none)'}; "
                               f"upload one of {', '.join(SUFFIXES)}", param="file",
                               code="unsupported_file_type")
        try:
            spooled = spool(file.file, settings.work_dir / "uploads", settings.max_upload_bytes,
                            suffix=suffix)
        except TooLarge:
            raise UnlearnError(f"{filename} is larger than the limit of {settings.max_upload_bytes} "
                               "bytes (MAX_UPLOAD_BYTES)", param="file", code="file_too_large") from None
        file_id = new_id("file")
        key = f"files/{tenant}/{file_id}{suffix}"
        row = File(id=file_id, tenant=tenant, purpose=purpose, filename=filename, bytes=spooled.bytes,
                   sha256=spooled.sha256, status="validating", storage_key=key)
        later = spooled.bytes > settings.validate_inline_bytes
        try:
            if not later:
                _apply(row, _report(settings, spooled.path, purpose, filename))
            store.put(key, spooled.path)
            try:
                session.add(row)
                session.commit()  # the row exists only once the object does
            except BaseException:
                store.delete(key)
                raise
        except BaseException:
            spooled.path.unlink(missing_ok=True)
            raise
        if later:
            background.add_task(_validate_later, request.app.state.sessions, settings, file_id,
                                spooled.path, purpose, filename)
        else:
            spooled.path.unlink(missing_ok=True)
        return FileObject.of(row)

    @router.get("", response_model=ListResponse[FileObject], summary="List files, newest first")
    def list_files(session: SessionDep, tenant: TenantDep,
                   purpose: Literal["forget", "retain", "eval"] | None = None,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20,
                   after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
                   ) -> ListResponse[FileObject]:
        rows, more = repo.list_files(session, tenant, purpose=purpose, limit=limit, after=after)
        return ListResponse.page([FileObject.of(r) for r in rows], more)

    @router.get("/{file_id}", response_model=FileObject, summary="A file and its validation report")
    def get_file(file: FileDep) -> FileObject:
        return FileObject.of(file)

    @router.delete("/{file_id}", summary="Delete a file (not while an active job uses it)")
    def delete_file(file: FileDep, session: SessionDep, store: StoreDep) -> dict:
        if repo.file_in_use(session, file):
            raise Conflict(f"file {file.id} is used by a queued or running job; cancel the job first",
                           param="file_id", code="file_in_use")
        # The content goes; a row that past jobs reference stays as a tombstone (id, name,
        # sha256: the evidence of what was forgotten), hidden from the files API.
        repo.delete_file(session, file)
        session.commit()
        store.delete(file.storage_key)
        return {"id": file.id, "object": "file", "deleted": True}

    return router

