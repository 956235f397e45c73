"""The task: much like a web view, it parses (a job id), delegates (worker.runner),
records. And two threads of the worker's parent: the reaper, which re-sends the ids of
jobs a dead worker left behind, and the webhook sender."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.orm import sessionmaker

from core.engine.runtime import quiet_libraries, set_loss_backend, set_torch_threads
from core.service import webhooks
from core.service.db import make_engine, make_sessionmaker, utcnow
from core.service.enums import RUN_JOB_TASK
from core.service.repo import lost_queued_jobs, orphaned_jobs
from core.service.settings import Settings, get_settings
from core.service.storage import make_store
from worker.celery_app import app
from worker.runner import JobRunner

log = logging.getLogger(__name__)
_runner: JobRunner | None = None
_reaper_stop = threading.Event()


def reset_runner() -> None:
    """After a fork: drop connections inherited from the parent."""
    global _runner
    _runner = None
    _reaper_sessions.cache_clear()


def runner() -> JobRunner:
    """The job runner of this process, set up on its first job: torch threads and the loss
    backend are set here, in the process that trains (a prefork child, or a solo worker)."""
    global _runner
    if _runner is None:
        settings = get_settings()
        quiet_libraries()
        set_torch_threads(settings.worker_threads)
        set_loss_backend(settings.loss_backend)
        _runner = JobRunner(
            settings, make_sessionmaker(make_engine(settings.db_url)), make_store(settings)
        )
    return _runner


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> str:
    outcome = runner().run(job_id)
    log.info("job %s: %s", job_id, outcome, extra={"job_id": job_id})
    return outcome


@functools.cache
def _reaper_sessions() -> sessionmaker:
    """The reaper's own connections: it runs in the prefork parent, which must never set
    up the runner (that imports torch, whose OpenMP state a fork would break)."""
    return make_sessionmaker(make_engine(get_settings().db_url))


def reap_orphans() -> list[str]:
    """Jobs left running by a dead worker (lease expired), and queued jobs whose message
    was sent long ago and never taken (a lost message): send their ids again. The lease
    makes a duplicate harmless: whoever takes the job first runs it, others back off."""
    settings = get_settings()
    resend: list[tuple[str, str]] = []  # (job id, the queue of its worker class)
    with _reaper_sessions().begin() as session:
        for job in orphaned_jobs(session):
            log.warning("job %s: lease expired; re-sending it", job.id)
            resend.append((job.id, settings.queue_for(job.worker_class)))
        for job in lost_queued_jobs(session, settings.requeue_after_seconds):
            log.warning(
                "job %s: queued since %s and not taken; re-sending it", job.id, job.enqueued_at
            )
            job.enqueued_at = utcnow()
            resend.append((job.id, settings.queue_for(job.worker_class)))
    for job_id, queue in resend:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
    return [job_id for job_id, _ in resend]


@worker_process_init.connect
def _init_child(**_: object) -> None:
    """In each prefork child: drop DB connections inherited from the parent. (torch is
    set up by the first task, in the process that runs it: the child, or the solo worker.)"""
    reset_runner()


@worker_ready.connect
def _start_reaper(sender: object = None, **_: object) -> None:
    """Re-send jobs whose lease expired (their worker died), now and periodically. In a
    prefork worker this runs in the parent, with database connections of its own."""
    settings = get_settings()

    def loop() -> None:
        while True:
            try:
                reap_orphans()
            except Exception:  # the DB may be briefly away: try again later
                log.exception("reaper failed")
            if _reaper_stop.wait(settings.reap_every_seconds):
                return

    threading.Thread(target=loop, name="reaper", daemon=True).start()
    threading.Thread(target=_send_webhooks, args=(settings,), name="webhooks", daemon=True).start()
    log.info("worker ready (pid %s, device %s)", os.getpid(), settings.worker_device or "auto")


def _send_webhooks(settings: Settings) -> None:
    """Send due webhook deliveries (core.service.webhooks), in the parent like the reaper:
    no torch there, and a job running in the child does not hold them up."""
    owner = f"{socket.gethostname()}:{os.getpid()}:webhooks"
    while True:
        try:
            webhooks.deliver_due(_reaper_sessions(), settings, owner)
        except Exception:  # the DB may be briefly away: try again later
            log.exception("webhook delivery failed")
        if _reaper_stop.wait(settings.webhook_poll_seconds):
            return


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    _reaper_stop.set()
