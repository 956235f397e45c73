"""The task: much like a web view, it parses (a job id), delegates (core.runner), records."""

from __future__ import annotations

import logging

from core.db import make_engine, make_sessionmaker, utcnow
from core.repo import lost_queued_jobs, orphaned_jobs
from core.runner import TASK_NAME, JobRunner
from core.runtime import quiet_libraries, set_loss_backend, set_torch_threads
from core.settings import get_settings
from core.storage import make_store
from worker.celery_app import app

log = logging.getLogger(__name__)
_runner: JobRunner | None = None


def reset_runner() -> None:
    """After a fork: drop connections inherited from the parent."""
    global _runner
    _runner = None


def runner() -> JobRunner:
    global _runner
    if _runner is None:
        settings = get_settings()
        quiet_libraries()
        set_torch_threads(settings.worker_threads)
        set_loss_backend(settings.loss_backend)
        _runner = JobRunner(settings, make_sessionmaker(make_engine(settings.db_url)), make_store(settings))
    return _runner


@app.task(name=TASK_NAME)
def run_job(job_id: str) -> str:
    outcome = runner().run(job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome


def reap_orphans() -> list[str]:
    """Jobs left running by a dead worker (lease expired), and queued jobs whose message
    was sent long ago and never taken (a lost message): send their ids again. The lease
    makes a duplicate harmless: whoever takes the job first runs it, others back off."""
    settings = get_settings()
    with runner().sessions.begin() as session:
        job_ids = orphaned_jobs(session)
        for job_id in job_ids:
            log.warning("job %s: lease expired; re-sending it", job_id)
        for job in lost_queued_jobs(session, settings.requeue_after_seconds):
            log.warning("job %s: queued since %s and not taken; re-sending it", job.id, job.enqueued_at)
            job.enqueued_at = utcnow()
            job_ids.append(job.id)
    for job_id in job_ids:
        app.send_task(TASK_NAME, args=[job_id], queue=settings.task_queue)
    return job_ids
