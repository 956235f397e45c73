"""The Celery app of the workers. The broker carries only job ids.

`celery -A worker.celery_app worker` (or `unlearn worker`). The prefork parent never
imports torch: the task imports the pipeline in the child, and per-process torch
threads are set in `worker_process_init`, because torch's OpenMP is not fork-safe.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from core.service.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
app = Celery("unlearn", broker=settings.celery_broker_url, include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,               # a job's message is acked only when the job has ended
    task_reject_on_worker_lost=True,   # a killed child requeues its message at once
    worker_prefetch_multiplier=1,      # one job at a time per process: a GPU holds one job
    task_ignore_result=True,           # results live in the database, not a result backend
    task_default_queue=settings.task_queue,
    broker_transport_options=settings.broker_transport_options,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@worker_process_init.connect
def _init_child(**_: object) -> None:
    """In each prefork child: drop DB connections inherited from the parent. (torch is
    set up by the first task, in the process that runs it: the child, or the solo worker.)"""
    from worker import tasks

    tasks.reset_runner()


_reaper_stop = threading.Event()


@worker_ready.connect
def _start_reaper(sender: object = None, **_: object) -> None:
    """Re-send jobs whose lease expired (their worker died), now and periodically."""
    from worker.tasks import reap_orphans

    def loop() -> None:
        while True:
            try:
                reap_orphans()
            except Exception:  # the DB may be briefly away; try again later
                log.exception("reaper failed")
            if _reaper_stop.wait(settings.reap_every_seconds):
                return

    threading.Thread(target=loop, name="reaper", daemon=True).start()
    log.info("worker ready (pid %s, device %s)", os.getpid(), settings.worker_device or "auto")


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    _reaper_stop.set()
