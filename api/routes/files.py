"""/v1/files: upload (multipart, streamed to disk, hashed, validated), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Form, Query, Request, UploadFile, status
from fastapi import File as FormFile

from api.deps import CURSOR_PATTERN, FileDep, SessionDep, SettingsDep, StoreDep, TenantDep, WhoDep
from api.schemas import FileDeleted, FileObject, ListResponse
from api.services import files
from core.service import repo
from core.service.enums import Purpose
from core.service.metadata import metadata_filters, parse_metadata_json

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=FileObject,
    summary="Upload a forget, retain or eval file (JSONL or .txt)",
)
def upload(
    request: Request,
    session: SessionDep,
    who: WhoDep,
    store: StoreDep,
    settings: SettingsDep,
    background: BackgroundTasks,
    file: Annotated[UploadFile, FormFile(description="JSONL (qa, chat, text, mc) or .txt")],
    purpose: Annotated[Purpose, Form()],
    metadata: Annotated[
        str | None,
        Form(description='Your map of strings as a JSON object, e.g. {"ticket": "T-1"}.'),
    ] = None,
) -> FileObject:
    uploaded = files.upload(
        session,
        request.app.state.sessions,
        store,
        settings,
        who,
        file.file,
        file.filename,
        purpose,
        parse_metadata_json(metadata),
    )
    if uploaded.validate_later is not None:
        background.add_task(uploaded.validate_later)
    return FileObject.of(uploaded.row)


@router.get(
    "",
    response_model=ListResponse[FileObject],
    summary="List files, newest first",
    description="Filters: `purpose`, and `metadata[key]=value` (repeatable; all must hold).",
)
def list_files(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    purpose: Purpose | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(pattern=CURSOR_PATTERN, description="The last id of the previous page.")
    ] = None,
) -> ListResponse[FileObject]:
    rows, more = repo.list_files(
        session,
        tenant,
        purpose=purpose,
        limit=limit,
        after=after,
        metadata=metadata_filters(request.query_params.multi_items()),
    )
    return ListResponse.page([FileObject.of(r) for r in rows], more)


@router.get("/{file_id}", response_model=FileObject, summary="A file and its validation report")
def get_file(file: FileDep) -> FileObject:
    return FileObject.of(file)


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    summary="Delete a file (not while an active job uses it)",
)
def delete_file(file: FileDep, session: SessionDep, store: StoreDep, who: WhoDep) -> FileDeleted:
    files.delete(session, store, who, file)
    return FileDeleted(id=file.id)
