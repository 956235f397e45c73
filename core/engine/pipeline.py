"""One job, start to finish: validate -> load -> evaluate before -> unlearn ->
evaluate after -> audit (attacks, membership inference, a reference model, criteria
and the verdict) -> save artifacts -> report.

Validating and loading build the job's context (core.engine.job.open_job); each later
phase is a function of core.engine.phases, run in the order PHASES lists them.

The same function runs under `unlearn run` (progress bars) and under a Celery worker
(events written to the database): both report through core.engine.events. `python -m core run SPEC`
reproduces any job from its spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.engine.events import Events
from core.engine.job import JobOptions, Stopwatch, open_job
from core.engine.model_cache import ModelCache
from core.engine.phases import PHASES
from core.engine.spec import JobSpec
from core.engine.train import LoopResult

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    output_dir: Path
    artifacts: dict[str, Path]
    metrics: dict[str, Any]
    loop: LoopResult
    seconds: dict[str, float] = field(default_factory=dict)


def run_job(
    spec: JobSpec,
    output_dir: Path,
    *,
    events: Events | None = None,
    device: str | None = None,
    checkpoint_dir: Path | None = None,
    shown: dict[str, str] | None = None,
    max_tokens: int | None = None,
    chain: list[dict[str, Any]] | None = None,
    models: ModelCache | None = None,
) -> JobResult:
    """Run one job; file paths in `spec` are local. Writes artifacts under output_dir.
    `shown` names the base model and forget file in the report as its readers know them
    (the service's tenants see neither the operator's nor the worker's paths).
    `max_tokens` bounds steps x batch x accumulation x max_length, checked once the
    forget set is tokenized, before any evaluation (the service's per-job budget).
    `chain` names the jobs a sequential job follows, first job first (the service: by
    job id); by default, the chain its init_from_job directory records, then that
    directory. `models`: a warm cache of base models (a worker running job after job);
    each job gets its own copy, so none sees another's changes."""
    clock = Stopwatch()
    options = JobOptions(
        events=events or Events(),
        device=device,
        checkpoint_dir=checkpoint_dir,
        shown=shown or {},
        max_tokens=max_tokens,
        chain=chain,
        models=models,
    )
    ctx = open_job(spec, output_dir, options, clock)
    for phase in PHASES:
        phase(ctx)
    return JobResult(output_dir, ctx.artifacts, ctx.metrics, ctx.trained(), clock.laps)
