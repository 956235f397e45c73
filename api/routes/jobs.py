"""/v1/jobs: create (validated by the engine's registry before a row exists), list, get,
cancel, events, metrics, artifacts."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from api.deps import (
    CURSOR_PATTERN,
    JobDep,
    QueueDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    WhoDep,
)
from api.middleware import etag_listed
from api.schemas import ArtifactObject, EventObject, JobObject, ListResponse, MetricsObject
from api.services import jobs
from core.errors import SpecError
from core.service import logs, repo
from core.service.enums import JobStatus
from core.service.metadata import metadata_filters
from core.service.storage import iter_stream, media_type

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobObject,
    summary="Create an unlearning job",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}},
        }
    },
    responses={
        200: {"model": JobObject, "description": "An Idempotency-Key replay: the same job."}
    },
)
def create_job(
    body: Annotated[dict[str, Any], Body(description="The job spec: see JobCreate.")],
    response: Response,
    session: SessionDep,
    who: WhoDep,
    queue: QueueDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200, description="Retries with the same key and body return the same job."
        ),
    ] = None,
) -> JobObject:
    job, created = jobs.create(session, queue, settings, who, body, idempotency_key, store)
    logs.bind(job_id=job.id)
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobObject.of(job)


@router.get(
    "",
    response_model=ListResponse[JobObject],
    summary="List jobs, newest first",
    description="Filters: `status`, and `metadata[key]=value` (repeatable; all must hold).",
)
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(pattern=CURSOR_PATTERN, description="The last id of the previous page.")
    ] = None,
) -> ListResponse[JobObject]:
    rows, more = repo.list_jobs(
        session,
        tenant,
        status=status_,
        limit=limit,
        after=after,
        metadata=metadata_filters(request.query_params.multi_items()),
    )
    return ListResponse.page([JobObject.of(r) for r in rows], more)


@router.get("/{job_id}", response_model=JobObject, summary="A job: status, progress, error")
async def get_job(job: JobDep) -> JobObject:
    return JobObject.of(job)


@router.post("/{job_id}/cancel", response_model=JobObject, summary="Cancel a job (cooperative)")
def cancel_job(job: JobDep, session: SessionDep, who: WhoDep) -> JobObject:
    return JobObject.of(jobs.cancel(session, who, job.id))


@router.get(
    "/{job_id}/events",
    response_model=ListResponse[EventObject],
    summary="Phase changes, step losses (throttled), probes, status changes; oldest first",
)
def list_events(
    job: JobDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        int | None, Query(ge=0, le=2**31 - 1, description="The last event id seen.")
    ] = None,
) -> ListResponse[EventObject]:
    rows, more = repo.list_events(session, job.id, limit=limit, after=after)
    return ListResponse.page(
        [EventObject.of(r) for r in rows],
        more,
        empty_cursor=str(after) if after is not None else None,
    )


def _last_seen(
    last_event_id: Annotated[
        str | None, Header(description="The last event id this client saw.")
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, description="The last event number seen (without the header).")
    ] = None,
) -> int | None:
    """The event number a stream resumes after: Last-Event-ID wins over `after`. A
    dependency, so a bad one is a 422 before the stream starts."""
    if last_event_id is None or last_event_id.strip() == "":
        return after
    if not last_event_id.strip().isdigit():
        raise SpecError(
            f"Last-Event-ID {last_event_id[:50]!r} is not an event id of this stream (a number)",
            param="Last-Event-ID",
        )
    return int(last_event_id)


HEARTBEAT_SECONDS = 15.0  # a comment on a stream after this long without an event


class _HeldStream(StreamingResponse):
    """A stream that gives its tenant's slot back however it ends: finished, closed by
    the client, or never started (a client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        # not cached, and not buffered by a proxy (nginx) on the way
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="The job's events, live, as Server-Sent Events",
    description="Each event is an SSE event: `id` its number, `event` its type, `data` the "
    "event object as in /events. A reconnecting client sends `Last-Event-ID` (or `after`) "
    "and gets what followed it; a comment every 15 s keeps idle connections open; after "
    "a final status the stream ends with an `end` event carrying it. A stream that carried "
    "no event for STREAM_IDLE_SECONDS (default 300) is closed: reconnect with "
    "`Last-Event-ID`. A tenant holds at most MAX_STREAMS_PER_TENANT streams (default 20) "
    "per API process: 429 `too_many_streams` with Retry-After beyond.",
)
async def stream_events(
    job: JobDep,
    tenant: TenantDep,
    settings: SettingsDep,
    request: Request,
    last: Annotated[int | None, Depends(_last_seen)],
) -> StreamingResponse:
    slots = request.app.state.streams
    slots.take(tenant)
    idle_close = settings.stream_idle_seconds
    follow = request.app.state.feeds.follow(job.id, last, min(HEARTBEAT_SECONDS, idle_close))
    return _HeldStream(_sse(follow, idle_close), lambda: slots.give_back(tenant))


async def _sse(
    follow: AsyncGenerator[tuple[str, Any], None], idle_close: float
) -> AsyncIterator[bytes]:
    """The feed's items as SSE bytes: each batch of events in one write (made once per
    event for all its streams), the end event, a comment for an idle spell; after
    `idle_close` seconds without an event, a comment saying so, and the stream ends."""
    quiet_since = time.monotonic()
    async with contextlib.aclosing(follow) as items:
        async for kind, item in items:
            if kind == "events":
                quiet_since = time.monotonic()
                yield b"".join(event.frame for event in item)
            elif kind == "end":
                yield jobs.sse_frame(json.dumps({"status": item}), event="end")
            elif time.monotonic() - quiet_since >= idle_close:
                yield f": no event for {idle_close:g} s: reconnect with Last-Event-ID\n\n".encode()
                return
            else:
                yield b": ping\n\n"


@router.get("/{job_id}/metrics", response_model=MetricsObject, summary="Before/after metrics")
async def get_metrics(job: JobDep) -> MetricsObject:
    return MetricsObject.of(job)


@router.get(
    "/{job_id}/artifacts",
    response_model=ListResponse[ArtifactObject],
    summary="The job's artifacts (adapter or model, report) with bytes and sha256",
)
def list_artifacts(job: JobDep, session: SessionDep) -> ListResponse[ArtifactObject]:
    rows = repo.list_artifacts(session, job.id)
    return ListResponse.page([ArtifactObject.of(r) for r in rows], False)


@router.get(
    "/{job_id}/token-probabilities",
    summary="The report's per-token probabilities before and after (paper Fig. 2), as JSON",
    description="What the dashboard's token view shows: for sample forget answers, each "
    "token's probability under the model before and after. A read for display: unlike a "
    "download of the report archive, it adds no `artifact.downloaded` audit entry.",
)
def get_token_probabilities(job: JobDep, session: SessionDep, store: StoreDep) -> dict[str, Any]:
    return jobs.token_probabilities(session, store, job)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact (.tar.gz, or .tar for weights; files at its root)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}, "application/x-tar": {}}},
        206: {"description": "The bytes a `Range` header asked for (a resumed download)."},
        304: {"description": "`If-None-Match` names the archive's ETag (its sha256)."},
        307: {"description": "Redirect to a short-lived presigned URL (S3, which answers ranges)."},
        416: {"description": "The `Range` starts past the archive's end."},
    },
)
def download_artifact(
    job: JobDep,
    name: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    who: WhoDep,
) -> Response:
    """The archive. The ETag is its sha256: `If-None-Match` answers 304, and `Range`
    (with `If-Range`) resumes a download from the local store; on S3 the redirect's URL
    answers ranges itself."""
    artifact = jobs.downloadable(session, job, name)
    etag = f'"{artifact.sha256}"'
    if etag_listed(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    byte_range = request.headers.get("range")
    jobs.record_download(session, who, job, artifact, byte_range)
    headers = {
        "Content-Disposition": f'attachment; filename="{artifact.filename}"',
        "X-Checksum-SHA256": artifact.sha256,
        "ETag": etag,
    }
    if settings.s3_redirect_downloads:
        url = store.presigned_url(artifact.storage_key, artifact.filename)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    path = store.local_path(artifact.storage_key)
    if path is not None:  # Starlette answers Range, If-Range and an unsatisfiable range
        return FileResponse(path, media_type=media_type(artifact.filename), headers=headers)
    return StreamingResponse(
        iter_stream(store.open(artifact.storage_key)),
        media_type=media_type(artifact.filename),
        headers={**headers, "Content-Length": str(artifact.bytes), "Accept-Ranges": "none"},
    )


@router.get(
    "/{job_id}/certificate",
    summary="The job's signed unlearning certificate (canonical JSON, Ed25519)",
    response_class=Response,
    responses={
        200: {
            "content": {"application/json": {}},
            "description": "Verify it offline: `unlearn verify CERT`.",
        }
    },
)
def get_certificate(job: JobDep, session: SessionDep, who: WhoDep) -> Response:
    return Response(
        jobs.certificate(session, who, job).encode(),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{job.id}-certificate.json"'},
    )
