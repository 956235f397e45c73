"""/v1/jobs: create (validated by the engine's registry before a row exists), list, get,
cancel, events, metrics, artifacts."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError

from api.deps import JobDep, QueueDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import ArtifactObject, EventObject, JobObject, ListResponse, MetricsObject
from core import repo
from core.db import ACTIVE_STATUSES, TERMINAL_STATUSES, Job, new_id, utcnow
from core.errors import Conflict, SpecError, Unavailable, UnlearnError
from core.spec import JobSpec, parse_spec
from core.spec_parts import EVAL_FILE_KINDS, TRAIN_FILE_KINDS
from core.storage import iter_stream

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Which purpose and file kinds each slot accepts (the kinds are the engine's: core.spec_parts).
FILE_SLOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "forget_file": ("forget", TRAIN_FILE_KINDS),
    "retain_file": ("retain", TRAIN_FILE_KINDS),
    **{f"eval.{name}": ("eval", kinds) for name, kinds in EVAL_FILE_KINDS.items()},
}


def _check_files(session: Any, tenant: str, spec: JobSpec) -> None:
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
            raise SpecError(f"{slot}: no file {file_id!r} (upload it with POST /v1/files)",
                            param=slot, code="file_not_found") from None
        if row.purpose != purpose:
            raise SpecError(f"{slot}: file {file_id} was uploaded with purpose {row.purpose!r}; "
                            f"this slot needs purpose {purpose!r}", param=slot, code="wrong_file_purpose")
        if row.status != "valid":
            detail = (row.report or {}).get("summary") or "it is still being validated"
            raise SpecError(f"{slot}: file {file_id} is {row.status}: {detail}", param=slot,
                            code="file_not_valid")
        if row.kind not in kinds:
            raise SpecError(f"{slot}: file {file_id} holds {row.kind} records; this slot needs "
                            f"{' or '.join(kinds)}", param=slot, code="wrong_file_kind")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobObject,
             summary="Create an unlearning job",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/JobCreate"}}}}},
             responses={200: {"model": JobObject, "description": "An Idempotency-Key replay: the same job."}})
def create_job(
    body: Annotated[dict[str, Any], Body(description="The job spec: see JobCreate.")],
    response: Response, session: SessionDep, tenant: TenantDep, queue: QueueDep,
    idempotency_key: Annotated[str | None, Header(
        max_length=200, description="Retries with the same key and body return the same job.")] = None,
) -> JobObject:
    digest = repo.request_hash(body)
    if idempotency_key:
        existing = repo.find_idempotent(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, response)
    spec = parse_spec(body)
    repo.get_model(session, spec.base_model)
    _check_files(session, tenant, spec)
    job = Job(id=new_id("job"), tenant=tenant, status="queued", method=spec.method,
              base_model=spec.base_model, forget_file_id=spec.forget_file,
              retain_file_id=spec.retain_file, spec=spec.model_dump(mode="json"),
              idempotency_key=idempotency_key, request_hash=digest, step=0, attempts=0,
              cancel_requested=False, enqueued_at=utcnow())
    session.add(job)
    repo.add_event(session, job.id, "status", "job queued", {"status": "queued"})
    try:
        session.commit()  # the row is committed before its id goes to the broker
    except IntegrityError:
        session.rollback()  # a concurrent retry with the same Idempotency-Key won the race
        existing = repo.find_idempotent(session, tenant, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest, response)
    try:
        queue.send(job.id)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        session.delete(job)
        session.commit()
        raise Unavailable("the job queue is unavailable; nothing was created, retry shortly",
                          code="queue_unavailable") from exc
    log.info("job %s created for tenant %s (%s)", job.id, tenant, spec.method)
    return JobObject.of(job)


def _replay(existing: Job, digest: str, response: Response) -> JobObject:
    if existing.request_hash != digest:
        raise SpecError("this Idempotency-Key was already used with a different request body; "
                        "use a new key for a new job", param="Idempotency-Key",
                        code="idempotency_key_reused")
    response.status_code = status.HTTP_200_OK
    return JobObject.of(existing)


@router.get("", response_model=ListResponse[JobObject], summary="List jobs, newest first")
def list_jobs(session: SessionDep, tenant: TenantDep,
              status_: Annotated[Literal["queued", "running", "evaluating", "succeeded", "failed",
                                         "cancelled"] | None, Query(alias="status")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
              ) -> ListResponse[JobObject]:
    rows, more = repo.list_jobs(session, tenant, status=status_, limit=limit, after=after)
    return ListResponse.page([JobObject.of(r) for r in rows], more)


@router.get("/{job_id}", response_model=JobObject, summary="A job: status, progress, error")
async def get_job(job: JobDep) -> JobObject:
    return JobObject.of(job)


@router.post("/{job_id}/cancel", response_model=JobObject, summary="Cancel a job (cooperative)")
def cancel_job(job: JobDep, session: SessionDep) -> JobObject:
    job = repo.get_job(session, job.tenant, job.id, for_update=True)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job.id} already {job.status}; nothing to cancel", param="job_id",
                       code="job_not_cancellable")
    if job.status == "queued" and job.lease_owner is None:
        repo.finish_job(session, job, "cancelled")
    elif not job.cancel_requested:
        # The worker's loop checks this flag before every step and stops there.
        job.cancel_requested = True
        repo.add_event(session, job.id, "message", "cancel requested", {"cancel_requested": True})
    session.commit()
    return JobObject.of(job)


@router.get("/{job_id}/events", response_model=ListResponse[EventObject],
            summary="Phase changes, step losses (throttled), probes, status changes; oldest first")
def list_events(job: JobDep, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                after: Annotated[int | None, Query(ge=0, description="The last event id seen.")] = None,
                ) -> ListResponse[EventObject]:
    rows, more = repo.list_events(session, job.id, limit=limit, after=after)
    return ListResponse.page([EventObject.of(r) for r in rows], more,
                             empty_cursor=str(after) if after is not None else None)


@router.get("/{job_id}/metrics", response_model=MetricsObject, summary="Before/after metrics")
async def get_metrics(job: JobDep) -> MetricsObject:
    return MetricsObject(job_id=job.id, status=job.status, metrics=job.metrics)


@router.get("/{job_id}/artifacts", response_model=ListResponse[ArtifactObject],
            summary="The job's artifacts (adapter or model, report) with bytes and sha256")
def list_artifacts(job: JobDep, session: SessionDep) -> ListResponse[ArtifactObject]:
    rows = repo.list_artifacts(session, job.id)
    return ListResponse.page([ArtifactObject.of(r) for r in rows], False)


@router.get("/{job_id}/artifacts/{name}", summary="Download an artifact (.tar.gz, files at its root)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/gzip": {}}},
                       307: {"description": "Redirect to a short-lived presigned URL (S3)."}})
def download_artifact(job: JobDep, name: str, session: SessionDep, store: StoreDep,
                      settings: SettingsDep) -> Response:
    if job.status in ACTIVE_STATUSES:
        raise Conflict(f"job {job.id} is {job.status}; artifacts exist once it has succeeded",
                       param="job_id", code="job_not_finished")
    artifact = repo.get_artifact(session, job.id, name)
    if settings.s3_redirect_downloads:
        url = store.presigned_url(artifact.storage_key, artifact.filename)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        iter_stream(store.open(artifact.storage_key)), media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{artifact.filename}"',
                 "Content-Length": str(artifact.bytes), "X-Checksum-SHA256": artifact.sha256,
                 "ETag": f'"{artifact.sha256}"'})
