"""Send job ids to the workers by task name: the API never imports the worker package."""

from __future__ import annotations

from celery import Celery

from core.service.enums import RUN_JOB_TASK
from core.service.settings import Settings


class TaskQueue:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = Celery("unlearn-api", broker=settings.celery_broker_url)
        self.client.conf.update(
            broker_transport_options=settings.broker_transport_options,
            broker_connection_retry_on_startup=True,
            task_ignore_result=True,
        )

    def send(self, job_id: str, queue: str | None = None) -> None:
        """The id to the workers of `queue` (a worker class's; default: the one queue)."""
        self.client.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=queue or self.settings.task_queue,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )

    def ping(self) -> None:
        with self.client.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
