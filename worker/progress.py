"""The job's events, written to the database: the service's implementation of
core.engine.events. Phases and steps become events and progress columns on the job row
(steps coalesced: the first, then every step of a short job, at most
EVENT_MAX_STEP_POINTS on an even grid of a long one's, plus one per
EVENT_MIN_INTERVAL_SECONDS between grid points); cancel requests are read back from the
row; checkpoints are copied to the store, so any worker host can resume the job."""

from __future__ import annotations

import logging
import math
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from core.engine.events import Events, Phase, StepInfo
from core.service import repo
from core.service.enums import EventType, JobStatus
from core.service.settings import Settings
from core.service.storage import Store

log = logging.getLogger(__name__)


def checkpoint_key(job_id: str) -> str:
    """Where a job's latest checkpoint is kept in the store while it runs."""
    return f"jobs/{job_id}/checkpoint.tar"


def on_step_grid(step: int, total_steps: int, points: int) -> bool:
    """Whether `step` is one of the at most `points` steps, evenly spaced and ending at the
    last, that are always written: every step when the job has no more than `points`."""
    stride = max(1, math.ceil(total_steps / max(points, 1)))
    return step == total_steps or step % stride == 0


class DatabaseEvents(Events):
    """Events of one job, to its row and event log. `lease_lost` says when another worker
    has taken the job over: the loop then stops as if cancelled."""

    def __init__(
        self,
        sessions: sessionmaker,
        job_id: str,
        settings: Settings,
        lease_lost: Callable[[], bool],
        store: Store | None = None,
    ) -> None:
        self.sessions, self.job_id, self.settings = sessions, job_id, settings
        self.lease_lost, self.store = lease_lost, store
        self._last_step_write = -math.inf  # the first step is always written
        self._pending: StepInfo | None = None
        self._last_cancel_check = 0.0
        self._cancel = False

    def phase(self, name: str, detail: str | None = None) -> None:
        self._flush_step()
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, self.job_id)
            job.phase = name
            if name == Phase.EVALUATING_AFTER:
                job.status = JobStatus.EVALUATING
            repo.add_event(
                session,
                self.job_id,
                EventType.PHASE,
                name + (f": {detail}" if detail else ""),
                {"phase": name, "detail": detail},
            )
        log.info("job %s: phase %s %s", self.job_id, name, detail or "")

    def step(self, info: StepInfo) -> None:
        self._pending = info
        now = time.monotonic()
        if (
            on_step_grid(info.step, info.total_steps, self.settings.event_max_step_points)
            or now - self._last_step_write >= self.settings.event_min_interval_seconds
        ):
            self._flush_step()

    def _flush_step(self) -> None:
        info, self._pending = self._pending, None
        if info is None:
            return
        self._last_step_write = time.monotonic()
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, self.job_id)
            job.step, job.total_steps, job.loss = info.step, info.total_steps, info.loss
            repo.add_event(
                session,
                self.job_id,
                EventType.STEP,
                f"step {info.step}/{info.total_steps} loss {info.loss:.4f}",
                {
                    "step": info.step,
                    "total_steps": info.total_steps,
                    "loss": info.loss,
                    "terms": info.terms,
                    "learning_rate": info.learning_rate,
                    "tokens_per_second": round(info.tokens_per_second, 1),
                    "eta_seconds": None if info.eta_seconds is None else round(info.eta_seconds, 1),
                },
            )

    def probe(self, step: int, result: dict[str, float]) -> None:
        with self.sessions.begin() as session:
            repo.add_event(
                session,
                self.job_id,
                EventType.PROBE,
                f"probe at step {step}: forget {result['forget']:.3f}, utility {result['utility']:.3f}",
                dict(result),
            )

    def warning(self, message: str) -> None:
        with self.sessions.begin() as session:
            repo.add_event(session, self.job_id, EventType.WARNING, message, {})
        log.warning("job %s: %s", self.job_id, message)

    def resumed(self, step: int) -> None:
        with self.sessions.begin() as session:
            job = repo.get_job(session, None, self.job_id)
            job.resumed_from_step = step
            repo.add_event(
                session,
                self.job_id,
                EventType.MESSAGE,
                f"resumed from the checkpoint at step {step}",
                {"resumed_from_step": step},
            )

    def checkpoint(self, path: Path) -> None:
        if self.store is None or not self.settings.checkpoints_to_store:
            return
        archive = path.parent / f".{path.name}.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(path, arcname=path.name)
        self.store.put(checkpoint_key(self.job_id), archive)
        archive.unlink()

    def should_cancel(self) -> bool:
        if self.lease_lost():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now
            with self.sessions() as session:
                self._cancel = repo.cancel_requested(session, self.job_id)
        return self._cancel
