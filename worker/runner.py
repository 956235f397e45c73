"""Run one job of the service: take the lease, fetch inputs (worker.inputs), run the
pipeline, store the artifacts and certify (worker.outputs), record the outcome. The Celery
task is a thin wrapper around `JobRunner.run`.

The job row is the truth. A delivery that finds the job finished returns; one that finds
a live lease (another worker is on it) backs off. The heartbeat renews the lease while
the job runs; if it stops (the worker was killed) the lease expires, a reaper re-sends
the job id, and the next worker resumes from the job's last checkpoint.

`JobRunner` is one per process and holds only what outlives a job (settings, database,
store, the warm model cache); what belongs to one job is a `JobRun`, made for each run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.engine.events import Phase
from core.errors import JobCancelled, UnlearnError
from core.service import audit, logs, repo
from core.service.enums import TERMINAL_STATUSES, EventType, JobStatus
from core.service.quotas import limits_for
from core.service.settings import Settings
from core.service.storage import Store
from worker.inputs import fetch_inputs, restore_checkpoint
from worker.outputs import certify, store_artifacts
from worker.progress import DatabaseEvents, checkpoint_key
from worker.redaction import Redactions

if TYPE_CHECKING:
    from core.engine.model_cache import ModelCache
    from core.engine.pipeline import JobResult

log = logging.getLogger(__name__)

LEASE_LOST = "lease lost; the other worker continues"


class LeaseLost(Exception):
    """Another worker took the job over (our heartbeat could not renew the lease)."""


def worker_identity() -> str:
    """This worker process, as lease owner: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat(threading.Thread):
    """Renews the job's lease every heartbeat_seconds; notices when it is lost."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, owner: str, settings: Settings
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.sessions, self.job_id, self.owner, self.settings = sessions, job_id, owner, settings
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_seconds):
            try:
                with self.sessions.begin() as session:
                    if not repo.renew_lease(
                        session, self.job_id, self.owner, self.settings.lease_seconds
                    ):
                        self.lost = True
                        log.warning("job %s: lease lost to another worker", self.job_id)
                        return
            except Exception:  # a DB blip: try again next beat; the lease has slack
                log.exception("job %s: heartbeat failed", self.job_id)

    def stop(self) -> None:
        self.stopped.set()


@dataclass(frozen=True)
class JobRun:
    """One run of one job on this worker: its id, its heartbeat, its work directory
    (inputs/, checkpoints/, output/, archives/) and the paths its failure message names
    as the tenant knows them. Made for each run and passed to what the run calls."""

    job_id: str
    heartbeat: Heartbeat
    work: Path
    redactions: Redactions


class JobRunner:
    """Runs jobs in this process, one at a time; one instance per process."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: Store,
        owner: str | None = None,
    ) -> None:
        self.settings, self.sessions, self.store = settings, sessions, store
        self.owner = owner or worker_identity()
        self._models: ModelCache | None = None

    def _model_cache(self) -> ModelCache:
        """The warm cache of base models this process keeps between jobs (created in the
        process that runs jobs: it holds torch tensors)."""
        if self._models is None:
            from core.engine.model_cache import ModelCache

            self._models = ModelCache(self.settings.model_cache_bytes)
        return self._models

    def run(self, job_id: str) -> str:
        """Run the job if this worker can take it. Returns what happened, for logs."""
        with logs.bound(job_id=job_id):
            return self._run(job_id)

    def _run(self, job_id: str) -> str:
        with self.sessions.begin() as session:
            acquired = repo.acquire_lease(session, job_id, self.owner, self.settings.lease_seconds)
        if not acquired:
            return self._not_acquired(job_id)
        heartbeat = Heartbeat(self.sessions, job_id, self.owner, self.settings)
        heartbeat.start()
        try:
            self._record_running(job_id)
            work = self.settings.work_dir / "jobs" / job_id
            return self._execute(
                JobRun(job_id, heartbeat, work, Redactions(self.settings.work_dir))
            )
        finally:
            heartbeat.stop()

    def _record_running(self, job_id: str) -> None:
        """The running event and audit entry of this attempt, naming this worker."""
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, job_id)
            logs.bind(tenant=job.tenant)
            repo.add_event(
                session,
                job_id,
                EventType.STATUS,
                f"job running (attempt {job.attempts})",
                {
                    "status": JobStatus.RUNNING,
                    "attempt": job.attempts,
                    "worker": self.owner,
                    "worker_class": self.settings.worker_class,
                },
            )
            audit.append(
                session,
                job.tenant,
                actor="worker",
                action="job.running",
                subject=job_id,
                data={"attempt": job.attempts},
            )
            attempts = job.attempts
        log.info("job %s: running (attempt %s) on %s", job_id, attempts, self.owner)

    def _not_acquired(self, job_id: str) -> str:
        """Why this worker did not take the job; a job cancelled before it started ends."""
        with self.sessions.begin() as session:
            job = repo.find_job(session, job_id)
            if job is None:
                return "no such job"
            if job.status in TERMINAL_STATUSES:
                return f"already {job.status}"
            if job.cancel_requested and (job.lease_owner is None or job.status == JobStatus.QUEUED):
                repo.finish_job(session, job, JobStatus.CANCELLED)
                return "cancelled before it started"
            return f"leased by {job.lease_owner} until {job.lease_expires_at}; backing off"

    def _execute(self, run: JobRun) -> str:
        """Run the job to its end: succeeded, cancelled or failed (unless the lease was
        lost, when the other worker ends it). Returns what happened."""
        events = DatabaseEvents(
            self.sessions, run.job_id, self.settings, lambda: run.heartbeat.lost, self.store
        )
        try:
            result = self._run_pipeline(run, events)
            events.phase(Phase.UPLOADING)
            store_artifacts(
                self.settings,
                self.sessions,
                self.store,
                run.job_id,
                result.artifacts,
                run.work / "archives",
            )
            self._succeed(run, result.metrics)
            return "succeeded"
        except LeaseLost:
            return LEASE_LOST
        except JobCancelled as exc:
            if run.heartbeat.lost:
                return LEASE_LOST
            self._fail(run, JobStatus.CANCELLED, None, str(exc.message))
            shutil.rmtree(run.work, ignore_errors=True)
            return "cancelled"
        except UnlearnError as exc:
            self._fail(run, JobStatus.FAILED, exc.code, exc.message)
            return f"failed: {exc.code}"
        except Exception as exc:  # the job must end failed, never stuck running
            log.exception("job %s failed", run.job_id)
            code, message = _unexpected(exc)
            self._fail(run, JobStatus.FAILED, code, message)
            return f"failed: {code}"

    def _run_pipeline(self, run: JobRun, events: DatabaseEvents) -> JobResult:
        """Fetch the job's inputs and run the engine's pipeline on them, from the job's
        last checkpoint if it has one."""
        from core.engine.pipeline import run_job  # torch is imported here, in the worker child only

        inputs = fetch_inputs(
            self.settings,
            self.sessions,
            self.store,
            run.job_id,
            run.work / "inputs",
            run.redactions,
        )
        restore_checkpoint(self.settings, self.store, run.job_id, run.work / "checkpoints")
        with self.sessions() as session:
            tenant = repo.get_job(session, None, run.job_id).tenant
            limits = limits_for(self.settings, repo.get_tenant(session, tenant))
        return run_job(
            inputs.spec,
            run.work / "output",
            models=self._model_cache(),
            events=events,
            device=self.settings.worker_device,
            checkpoint_dir=run.work / "checkpoints",
            shown=inputs.shown,
            max_tokens=limits.max_job_tokens,
            chain=inputs.chain,
        )

    def _succeed(self, run: JobRun, metrics: dict[str, Any]) -> None:
        """Record the job succeeded with its metrics and certificate, if this worker still
        holds it (else LeaseLost); then drop its work directory and stored checkpoint."""
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, run.job_id)
            if job.lease_owner != self.owner:
                raise LeaseLost
            job.metrics = _json_safe(metrics)
            repo.finish_job(session, job, JobStatus.SUCCEEDED)
            audit.append(
                session,
                job.tenant,
                actor="worker",
                action="job.succeeded",
                subject=run.job_id,
                data={"verdict": job.metrics.get("verdict")},
            )
            certify(session, job, self.settings)
        shutil.rmtree(run.work, ignore_errors=True)
        self.store.delete(checkpoint_key(run.job_id))

    def _fail(self, run: JobRun, status: str, code: str | None, message: str | None) -> None:
        """End the job (if this worker still holds it) with a message fit for its tenant."""
        message = run.redactions.redact(message)[:2000] if message else message
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, run.job_id)
            if job.lease_owner == self.owner:
                repo.finish_job(session, job, status, error_code=code, error_message=message)
                audit.append(
                    session,
                    job.tenant,
                    actor="worker",
                    action=f"job.{status}",
                    subject=run.job_id,
                    data={"error_code": code} if code else {},
                )


def _unexpected(exc: Exception) -> tuple[str, str]:
    """The code and message of a failure the engine did not name. A database error's text
    carries its SQL and parameters: only its class is shown."""
    name = type(exc).__name__
    if isinstance(exc, SQLAlchemyError):
        return (
            "database_error",
            f"a database error interrupted the job ({name}); retrying may help, and the "
            "operator has the worker's log",
        )
    if "OutOfMemory" in name:
        return (
            "out_of_memory",
            "the job ran out of GPU memory: lower hyperparameters.batch_size or "
            "max_length, raise gradient_accumulation_steps, or use adapter.type=lora",
        )
    return (
        "internal_error",
        f"the job failed unexpectedly ({name}: {str(exc)[:500]}); retrying may help, "
        "and the operator has the worker's log",
    )


def _json_safe(value: Any) -> Any:
    """Metrics go into a JSON column: floats like NaN become null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
