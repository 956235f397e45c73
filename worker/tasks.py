"""The task: much like a web view, it parses (a job id), delegates (core.runner), records."""

from __future__ import annotations

import logging

from core.db import make_engine, make_sessionmaker
from core.repo import orphaned_jobs
from core.runner import JobRunner
from core.runtime import quiet_libraries, set_torch_threads
from core.settings import get_settings
from core.storage import make_store
from worker.celery_app import TASK_NAME, app

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
        _runner = JobRunner(settings, make_sessionmaker(make_engine(settings.db_url)), make_store(settings))
    return _runner


@app.task(name=TASK_NAME)
def run_job(job_id: str) -> str:
    outcome = runner().run(job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome


def reap_orphans() -> list[str]:
    """Jobs left running by a dead worker (lease expired): send their ids again. The
    lease makes a duplicate harmless: whoever takes it first runs it, others back off."""
    with runner().sessions() as session:
        job_ids = orphaned_jobs(session)
    for job_id in job_ids:
        log.warning("job %s: lease expired; re-sending it", job_id)
        app.send_task(TASK_NAME, args=[job_id])
    return job_ids
