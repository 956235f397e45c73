"""The Celery app of the workers. The broker carries only job ids.

`celery -A worker.celery_app worker` (or `unlearn worker`). The task, the reaper and
the worker's signal handlers are in worker.tasks, which the app includes. The prefork
parent never imports torch: torch's OpenMP is not fork-safe.
"""

from __future__ import annotations

from celery import Celery, signals

from core.service import logs
from core.service.settings import get_settings

settings = get_settings()
app = Celery("unlearn", broker=settings.celery_broker_url, include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,  # a job's message is acked only when the job has ended
    task_reject_on_worker_lost=True,  # a killed child requeues its message at once
    worker_prefetch_multiplier=1,  # one job at a time per process: a GPU holds one job
    task_ignore_result=True,  # results live in the database, not a result backend
    task_default_queue=settings.task_queue,
    broker_transport_options=settings.broker_transport_options,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@signals.setup_logging.connect
def _logging(**_: object) -> None:
    """The service's log lines (core.service.logs), not Celery's own set-up."""
    logs.configure(settings.log_level, settings.log_format)
