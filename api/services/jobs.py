"""Jobs: creation (validated by the engine's registry, every file checked, the row
committed, then its id enqueued), cancellation, and what a download may serve."""

from __future__ import annotations

import contextlib
import json
import logging
import tarfile
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.queue import TaskQueue
from api.services.distill_files import check_distill_file
from core.engine.formats import check_pairing
from core.engine.spec import JobSpec, parse_spec
from core.engine.spec.methods import METHODS
from core.errors import (
    Conflict,
    DataError,
    LimitExceeded,
    NotFound,
    SpecError,
    Unavailable,
    UnlearnError,
)
from core.service import audit, capacity, repo
from core.service.audit import Who
from core.service.db import Artifact, File, Job, looks_like_id, new_id, utcnow
from core.service.enums import (
    ACTIVE_STATUSES,
    FILE_SLOTS,
    TERMINAL_STATUSES,
    EventType,
    FileStatus,
    JobStatus,
)
from core.service.metadata import parse_metadata
from core.service.quotas import check_work, estimated_examples, limits_for
from core.service.settings import Settings
from core.service.storage import Store

log = logging.getLogger(__name__)


def create(
    session: Session,
    queue: TaskQueue,
    settings: Settings,
    who: Who,
    body: dict[str, Any],
    idempotency_key: str | None,
    store: Store | None = None,
) -> tuple[Job, bool]:
    """(the job, whether it was created now). A retry with the same Idempotency-Key and
    body returns the job the first request created; another body with it is refused; a
    retry while the first request is still handing the job to the broker is told so.

    Everything that can fail runs before the row exists: the spec, its values, the
    tenant's limits (checked under the tenant's row lock), the files (under their row
    locks, so a file cannot be deleted between its check and the job naming it), the
    work the job asks for. The row is committed before its id goes to the broker (a
    worker must find it), so this is the one request that commits before it ends; if
    the broker does not take the id, the row is removed again and nothing was created."""
    tenant = who.tenant
    digest = repo.request_hash(body)
    if idempotency_key:
        existing = repo.find_idempotent(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    metadata = parse_metadata(body.get("metadata"))
    spec = parse_spec({k: v for k, v in body.items() if k != "metadata"})
    spec_json = spec.model_dump(mode="json")
    _check_serialisable(spec_json)
    limits = limits_for(settings, repo.lock_tenant(session, tenant))
    if repo.active_jobs(session, tenant) >= limits.max_active_jobs:
        raise LimitExceeded(
            f"tenant {tenant!r} has {limits.max_active_jobs} queued or running jobs, its limit; "
            "wait for one to finish (or cancel one), or ask the operator to raise the limit "
            "(MAX_ACTIVE_JOBS, or `unlearn tenants set`)",
            code="too_many_active_jobs",
            retry_after=30,
        )
    model = repo.get_model(session, spec.base_model)
    worker_class = None
    if settings.worker_classes:
        worker_class = capacity.route(
            settings.worker_classes,
            parameters=model.parameters,
            needs_gb=model.needs_gb,
            adapter_type=spec.adapter.type,
            model=spec.base_model,
            quantized=spec.adapter.quantize is not None,
            gpus=spec.resources.gpus,
            class_gpus=settings.worker_class_gpus,
        )
    start = _starting_job(session, tenant, spec, settings) if spec.init_from_job else None
    if spec.eval is not None:
        spec_json["eval"]["reference_model"] = _reference_model(session, spec)
    slots = _file_slots(spec)
    repo.lock_files(session, set(slots.values()))
    files = _check_files(session, tenant, slots)
    _check_contrast(spec, files)
    if store is not None and "distill_file" in files:
        check_distill_file(store, files["forget_file"], files["distill_file"])
    check_work(
        spec,
        estimated_examples(files["forget_file"], spec.hyperparameters.max_length),
        limits.max_job_tokens,
        tenant,
    )
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.QUEUED,
        method=spec.method,
        base_model=spec.base_model,
        forget_file_id=spec.forget_file,
        retain_file_id=spec.retain_file,
        spec=spec_json,
        init_from_job_id=start.id if start is not None else None,
        chain=[*(start.chain or []), start.id] if start is not None else None,
        meta=metadata or None,
        idempotency_key=idempotency_key,
        request_hash=digest,
        key_id=who.actor,
        step=0,
        attempts=0,
        cancel_requested=False,
        worker_class=worker_class,
        enqueued_at=None,  # set once the broker has the id
    )
    session.add(job)
    repo.add_job_files(session, job.id, slots)
    repo.add_event(session, job.id, EventType.STATUS, "job queued", {"status": JobStatus.QUEUED})
    audit.record(
        session,
        who,
        "job.created",
        job.id,
        {
            "method": spec.method,
            "base_model": spec.base_model,
            "files": slots,
            **({"init_from_job": start.id} if start is not None else {}),
        },
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = (
            repo.find_idempotent(session, tenant, idempotency_key) if idempotency_key else None
        )
        if existing is not None:  # a concurrent retry with the same key won the race
            return _replay(existing, digest), False
        raise SpecError(
            "a file this job names was deleted while the job was being created; upload it again",
            param="forget_file",
            code="file_not_found",
        ) from None
    try:
        queue.send(job.id, settings.queue_for(worker_class))
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        session.delete(job)
        session.commit()
        raise Unavailable(
            "the job queue is unavailable; nothing was created, retry shortly",
            code="queue_unavailable",
        ) from exc
    job.enqueued_at = utcnow()
    log.info("job %s created (%s)", job.id, spec.method, extra={"job_id": job.id})
    return job, True


def cancel(session: Session, who: Who, job_id: str) -> Job:
    """A queued job nobody took ends cancelled at once; a running one gets the flag its
    loop checks before every step. Concurrent cancels record it once."""
    job, changed = repo.request_cancel(session, who.tenant, job_id)
    if changed:
        action = "job.cancelled" if job.status == JobStatus.CANCELLED else "job.cancel_requested"
        audit.record(session, who, action, job.id)
    if not changed and job.status in TERMINAL_STATUSES:
        raise Conflict(
            f"job {job.id} already {job.status}; nothing to cancel",
            param="job_id",
            code="job_not_cancellable",
        )
    return job


def downloadable(session: Session, job: Job, name: str) -> Artifact:
    """The artifact `name` of a finished job."""
    if job.status in ACTIVE_STATUSES:
        raise Conflict(
            f"job {job.id} is {job.status}; artifacts exist once it has succeeded",
            param="job_id",
            code="job_not_finished",
        )
    return repo.get_artifact(session, job.id, name)


TOKEN_VIEW = "token_probabilities.json"
TOKEN_VIEW_MAX_BYTES = 8 * 1024 * 1024


def token_probabilities(session: Session, store: Store, job: Job) -> dict[str, Any]:
    """The report's per-token probabilities (paper Fig. 2), read from its archive in the
    store for a page to show: a read for display, not a download, so no audit entry."""
    artifact = downloadable(session, job, "report")
    with contextlib.closing(store.open(artifact.storage_key)) as stream:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if member.name.lstrip("./") == TOKEN_VIEW and member.isfile():
                    if member.size > TOKEN_VIEW_MAX_BYTES:
                        break
                    handle = archive.extractfile(member)
                    if handle is not None:
                        data: dict[str, Any] = json.loads(handle.read())
                        return data
    raise NotFound(
        f"job {job.id}'s report has no {TOKEN_VIEW} (a job without forget QA to show)",
        param="job_id",
        code="token_probabilities_not_found",
    )


def record_download(
    session: Session, who: Who, job: Job, artifact: Artifact, byte_range: str | None
) -> None:
    """A download served (a part of one, when `byte_range` is the request's Range)."""
    data = {"name": artifact.name, "sha256": artifact.sha256}
    if byte_range:
        data["range"] = byte_range[:100]
    audit.record(session, who, "artifact.downloaded", job.id, data)


class StreamedEvent(dict[str, Any]):
    """An event as /events shows it, and `.frame`, its Server-Sent Event (id, type, the
    event's JSON as data) made once for every stream that sends it (200 streams of a job
    would otherwise encode each event 200 times)."""

    frame: bytes


def sse_frame(data: str, *, event: str, id: str | None = None) -> bytes:
    """One Server-Sent Event: `data` is one line (JSON), `event` and `id` are ours."""
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def events_since(
    sessions: Any, job_id: str, after: int | None, limit: int = 500
) -> tuple[list[StreamedEvent], str, bool]:
    """(the job's events after event `after`, as the API shows them; its status, read
    before them, so a final status means no event will follow those; whether more wait)
    in one short session: an event stream holds no connection between polls."""
    from api.schemas import EventObject

    with sessions() as session:
        status = repo.get_job(session, None, job_id).status
        rows, more = repo.list_events(session, job_id, limit=limit, after=after)
        events = []
        for row in rows:
            shown = EventObject.of(row)
            event = StreamedEvent(shown.model_dump(mode="json"))
            event.frame = sse_frame(shown.model_dump_json(), event=event["type"], id=event["id"])
            events.append(event)
    return events, status, more


def last_event(sessions: Any, job_id: str) -> tuple[str, int]:
    """(the job's status, the number of its last event; 0 before any) in one session."""
    with sessions() as session:
        status = repo.get_job(session, None, job_id).status
        return status, repo.last_event_number(session, job_id)


def certificate(session: Session, who: Who, job: Job) -> str:
    """The job's signed certificate (its download is recorded)."""
    if job.certificate is None:
        raise Conflict(
            f"job {job.id} is {job.status}; a certificate is issued when a job succeeds",
            param="job_id",
            code="no_certificate",
        )
    audit.record(session, who, "certificate.downloaded", job.id)
    return job.certificate


def _check_serialisable(spec_json: dict[str, Any]) -> None:
    """The spec as the database stores it and every response writes it: strict JSON in
    UTF-8. Checked before anything is written, so a value that cannot be written back
    (check_values already refuses the known ones) is a 422, never a row that breaks the
    tenant's job list."""
    try:
        json.dumps(spec_json, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise SpecError(f"the spec cannot be stored as JSON text: {exc}") from None


def _reference_model(session: Session, spec: JobSpec) -> str | None:
    """The reference model the job's evidence is read against: the one the spec names
    (it must be registered), else the one an operator registered for its base model."""
    assert spec.eval is not None
    if spec.eval.reference_model is not None:
        try:
            return repo.get_model(session, spec.eval.reference_model).name
        except SpecError as exc:
            raise SpecError(
                f"eval.reference_model: {exc.message}", param="eval.reference_model", code=exc.code
            ) from None
    registered = repo.reference_for(session, spec.base_model)
    return registered.name if registered is not None else None


def _starting_job(session: Session, tenant: str, spec: JobSpec, settings: Settings) -> Job:
    """The job a sequential job starts from: the tenant's own (another tenant's is no job
    of theirs: 404), succeeded, on the same base model, its chain within the limit."""
    job_id = spec.init_from_job
    assert job_id is not None
    try:
        if not looks_like_id("job", job_id):
            raise NotFound(f"no job {job_id!r}")
        start = repo.get_job(session, tenant, job_id)
    except NotFound:
        raise NotFound(
            f"init_from_job: no job {job_id!r} (job ids look like job-0123...; "
            "GET /v1/jobs lists yours)",
            param="init_from_job",
            code="job_not_found",
        ) from None
    if start.status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"init_from_job: job {start.id} is {start.status}; a job starts from a succeeded "
            "job's output",
            param="init_from_job",
            code="job_not_succeeded",
        )
    if start.base_model != spec.base_model:
        raise SpecError(
            f"base_model: job {start.id} unlearned base model {start.base_model!r}, this job "
            f"names {spec.base_model!r}; a chain stays on one base model",
            param="base_model",
            code="base_model_mismatch",
        )
    length = len(start.chain or []) + 1
    if length > settings.max_chain_jobs:
        raise SpecError(
            f"init_from_job: job {start.id} ends a chain of {length} jobs, the limit "
            f"(MAX_CHAIN_JOBS) is {settings.max_chain_jobs}; start from the base model, or from "
            "a merged model registered as a base model",
            param="init_from_job",
            code="chain_too_long",
        )
    return start


def _replay(existing: Job, digest: str) -> Job:
    if existing.request_hash != digest:
        raise SpecError(
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new job",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if existing.enqueued_at is None and existing.status == JobStatus.QUEUED:
        raise Conflict(
            "the first request with this Idempotency-Key is still handing its job to the "
            "queue; retry shortly for its outcome",
            param="Idempotency-Key",
            code="request_in_progress",
            retry_after=1,
        )
    return existing


def _file_slots(spec: JobSpec) -> dict[str, str]:
    """slot -> file id of every file the job names; an id of another shape is no file of
    this service, refused before any query."""
    values = {
        "forget_file": spec.forget_file,
        "retain_file": spec.retain_file,
        "contrast_file": spec.contrast_file,
        "distill_file": spec.distill_file,
    }
    if spec.eval is not None:
        values.update({f"eval.{k}": v for k, v in spec.eval.files().items()})
    slots = {slot: file_id for slot, file_id in values.items() if file_id}
    for slot, file_id in slots.items():
        if not looks_like_id("file", file_id):
            raise SpecError(
                f"{slot}: no file {file_id!r} (file ids look like file-0123...; "
                "upload with POST /v1/files)",
                param=slot,
                code="file_not_found",
            )
    return slots


def _check_contrast(spec: JobSpec, files: dict[str, File]) -> None:
    """A method that reads contrast responses (FLAT) gets a contrast set that fits its
    forget set, as far as the files' kinds and record counts show: refused here, not
    when the job runs."""
    if not METHODS[spec.method].uses_contrast:
        return
    forget, contrast = files["forget_file"], files.get("contrast_file")
    try:
        check_pairing(
            forget.kind or "",
            forget.records or 0,
            contrast.kind if contrast is not None else None,
            contrast.records if contrast is not None else None,
        )
    except DataError as exc:
        raise SpecError(exc.message, param="contrast_file", code="contrast_mismatch") from None


def _check_files(session: Session, tenant: str, slots: dict[str, str]) -> dict[str, File]:
    """Every file the job names must be the tenant's, valid, of the right purpose and kind."""
    rows = {}
    for slot, file_id in slots.items():
        purpose, kinds = FILE_SLOTS[slot]
        try:
            row = repo.get_file(session, tenant, file_id)
        except UnlearnError:
            raise SpecError(
                f"{slot}: no file {file_id!r} (upload it with POST /v1/files)",
                param=slot,
                code="file_not_found",
            ) from None
        if row.purpose != purpose:
            raise SpecError(
                f"{slot}: file {file_id} was uploaded with purpose {row.purpose!r}; "
                f"this slot needs purpose {purpose.value!r}",
                param=slot,
                code="wrong_file_purpose",
            )
        if row.status != FileStatus.VALID:
            detail = (row.report or {}).get("summary") or "it is still being validated"
            raise SpecError(
                f"{slot}: file {file_id} is {row.status}: {detail}",
                param=slot,
                code="file_not_valid",
            )
        if row.kind not in kinds:
            raise SpecError(
                f"{slot}: file {file_id} holds {row.kind} records; this slot needs "
                f"{' or '.join(kinds)}",
                param=slot,
                code="wrong_file_kind",
            )
        rows[slot] = row
    return rows
