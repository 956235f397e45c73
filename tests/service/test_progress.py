"""Step events, coalesced by worker.progress.DatabaseEvents: a short job's loss curve has
every step, however fast its steps; a long job's stays bounded by the step grid (and the
interval between its points)."""

from __future__ import annotations

import pytest

from core.engine.events import StepInfo
from core.service import repo
from core.service.db import make_engine, make_sessionmaker
from core.service.enums import EventType
from core.service.migrate import upgrade
from core.service.settings import Settings
from tests.service.conftest import add_job_row
from worker.progress import DatabaseEvents, on_step_grid


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _run_steps(sessions, total: int, **settings: float) -> list[int]:
    """`total` steps reported as fast as the loop can (well within one interval); the
    steps that became events."""
    job_id = add_job_row(sessions, f"job-{total}")
    config = Settings(event_min_interval_seconds=3600, **settings)
    events = DatabaseEvents(sessions, job_id, config, lease_lost=lambda: False)
    for step in range(1, total + 1):
        events.step(StepInfo(step, total, 1.0 / step, {}, 1e-3, 100.0, None))
    with sessions() as session:
        rows, _ = repo.list_events(session, job_id, limit=10_000, after=None)
        job = repo.get_job(session, None, job_id)
        assert (job.step, job.total_steps) == (total, total)
    return [r.data["step"] for r in rows if r.type == EventType.STEP]


def test_a_short_job_s_loss_curve_has_every_step(sessions):
    assert _run_steps(sessions, 15) == list(range(1, 16))


def test_a_long_job_s_step_events_stay_bounded(sessions):
    steps = _run_steps(sessions, 5000, event_max_step_points=100)
    # the first step (the curve starts at once), then the grid's 100 points
    assert len(steps) == 101 and steps[:3] == [1, 50, 100] and steps[-1] == 5000
    assert steps == sorted(set(steps))


def test_the_step_grid():
    assert [s for s in range(1, 11) if on_step_grid(s, 10, 4)] == [3, 6, 9, 10]
    assert all(on_step_grid(s, 7, 200) for s in range(1, 8))
