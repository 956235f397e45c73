"""Prometheus metrics at /metrics (prometheus-client): the API's request latency by
route template, method and status, its open event streams and their feeds' polls, and
the jobs as the database knows them, read at
each scrape (the database is the truth about jobs, whichever worker ran them): jobs by
status, failures by code, the age of the oldest queued job, and the seconds each stage
of the last finished jobs took. With several API processes, set
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) so a scrape sums them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from core.service.db import Job, utcnow
from core.service.enums import JobStatus

REQUEST_SECONDS = Histogram(
    "unlearn_http_request_duration_seconds",
    "Time to answer an API request, by route template, method and status.",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENT_STREAMS = Gauge(
    "unlearn_event_streams",
    "Live event streams (/v1/jobs/{id}/events/stream) open.",
    multiprocess_mode="livesum",
)
CONNECTIONS_REFUSED = Counter(
    "unlearn_connections_refused",
    "Connections answered 503 and closed: their address held MAX_CONNECTIONS_PER_CLIENT.",
)
EVENT_STREAMS_REFUSED = Counter(
    "unlearn_event_streams_refused",
    "Event streams refused (429) because the tenant held MAX_STREAMS_PER_TENANT already.",
)
EVENT_FEED_POLLS = Counter(
    "unlearn_event_feed_polls",
    "Database polls for new events by the streams' shared per-job feeds.",
)
log = logging.getLogger(__name__)
RECENT_JOBS = 100  # the finished jobs whose stage times the summary covers


def observe_request(scope: dict, status: int, seconds: float) -> None:
    """One answered request, under its route's template (/v1/jobs/{job_id}, not the id:
    bounded cardinality); a path no route matched counts as `unmatched`. Called by the
    request-id middleware, which times every request for its access line anyway."""
    route = getattr(scope.get("route"), "path", "unmatched")
    REQUEST_SECONDS.labels(route, scope["method"], str(status)).observe(seconds)


class JobsCollector(Collector):
    """The jobs, read from the database at each scrape (a few aggregate queries)."""

    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        try:
            yield from self._collect()
        except SQLAlchemyError as exc:  # the request metrics are still worth a scrape
            log.warning("metrics: the jobs could not be read: %s", type(exc).__name__)
            yield GaugeMetricFamily(
                "unlearn_jobs_readable", "Whether the last scrape could read the jobs.", 0
            )

    def _collect(self) -> Iterator[Any]:
        with self.sessions() as session:
            by_status = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            failures = session.execute(
                select(Job.error_code, func.count())
                .where(Job.status == JobStatus.FAILED)
                .group_by(Job.error_code)
            ).all()
            oldest = session.scalar(
                select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED)
            )
            recent = session.execute(  # two parts alone, not each job's whole metrics
                select(Job.metrics["timings_s"], Job.metrics["throughput"])
                .where(Job.status == JobStatus.SUCCEEDED)
                .order_by(Job.finished_at.desc())
                .limit(RECENT_JOBS)
            ).all()
            waits = session.execute(
                select(Job.created_at, Job.started_at)
                .where(Job.started_at.is_not(None))
                .order_by(Job.started_at.desc())
                .limit(RECENT_JOBS)
            ).all()
        jobs = GaugeMetricFamily("unlearn_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs
        failed = CounterMetricFamily(
            "unlearn_job_failures", "Failed jobs by error code.", labels=["code"]
        )
        for code, count in failures:
            failed.add_metric([code or "none"], count)
        yield failed
        age = 0.0
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=utcnow().tzinfo)
            age = max(0.0, (utcnow() - oldest).total_seconds())
        yield GaugeMetricFamily(
            "unlearn_oldest_queued_job_seconds", "Age of the oldest queued job (0: none).", age
        )
        stages = SummaryMetricFamily(
            "unlearn_job_stage_seconds",
            f"Seconds per stage of the last {RECENT_JOBS} succeeded jobs (load, unlearn, ...).",
            labels=["stage"],
        )
        totals: dict[str, list[float]] = {}
        for timings, _ in recent:
            for stage, seconds in (timings or {}).items():
                totals.setdefault(stage, []).append(float(seconds))
        for stage, values in sorted(totals.items()):
            stages.add_metric([stage], count_value=len(values), sum_value=sum(values))
        yield stages
        queued = [(started - created).total_seconds() for created, started in waits]
        yield SummaryMetricFamily(
            "unlearn_job_queue_seconds",
            f"Seconds from submission to a worker's start, of the last {RECENT_JOBS} started jobs.",
            count_value=len(queued),
            sum_value=max(0.0, sum(queued)),
        )
        yield from _throughput([t for _, t in recent if t])
        yield GaugeMetricFamily(
            "unlearn_jobs_readable", "Whether the last scrape could read the jobs.", 1
        )


def _throughput(recent: list[dict[str, Any]]) -> Iterator[Any]:
    """What the workers measured of the last succeeded jobs, by device type: training
    speed (summaries: rate = sum / count) and the highest peak memory."""
    for name, key, what in (
        ("unlearn_job_steps_per_second", "steps_per_second", "Optimizer steps per second"),
        ("unlearn_job_tokens_per_second", "tokens_per_second", "Forget-set tokens per second"),
    ):
        family = SummaryMetricFamily(
            name, f"{what} while unlearning, of the last {RECENT_JOBS} jobs.", labels=["device"]
        )
        by_device: dict[str, list[float]] = {}
        for row in recent:
            if row.get(key) is not None:
                by_device.setdefault(str(row.get("device")), []).append(float(row[key]))
        for device, values in sorted(by_device.items()):
            family.add_metric([device], count_value=len(values), sum_value=sum(values))
        yield family
    peak = GaugeMetricFamily(
        "unlearn_job_peak_memory_bytes",
        f"The highest peak memory of the last {RECENT_JOBS} jobs: the device's (CUDA) and "
        "the worker process's resident set (host).",
        labels=["device", "kind"],
    )
    highest: dict[tuple[str, str], int] = {}
    for row in recent:
        for kind, value in (row.get("peak_memory") or {}).items():
            if value is not None:
                labels = (str(row.get("device")), kind.removesuffix("_bytes"))
                highest[labels] = max(highest.get(labels, 0), int(value))
    for (device, kind), value in sorted(highest.items()):
        peak.add_metric([device, kind], value)
    yield peak


def registry_for(sessions: sessionmaker) -> CollectorRegistry:
    """What /metrics serves: this process's request metrics (or every API process's, in
    multiprocess mode) and the jobs collector."""
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Process())
    registry.register(JobsCollector(sessions))
    return registry


class _Process(Collector):
    """The request histogram of this process (from the default registry)."""

    def collect(self) -> Iterator[Any]:
        for family in REGISTRY.collect():
            if family.name == "unlearn_http_request_duration_seconds":
                yield family


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
