"""One protocol for what a running job tells the outside world.

The loop, the stop rule, the pipeline and the demo builder report through an `Events`;
the CLI shows them as progress bars (`core.cli.ConsoleEvents`) and the worker writes
them to the job's row and event log (`worker.progress.DatabaseEvents`). The base class
reports nothing and never cancels, so every method is optional to override.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Phase(StrEnum):
    """A job's phases, in order. `uploading` is the worker's, after the pipeline."""

    VALIDATING = "validating"
    LOADING = "loading"
    EVALUATING_BEFORE = "evaluating_before"
    UNLEARNING = "unlearning"
    DISTILLING = "distilling"  # only with robustify (core.engine.robust.distill)
    EVALUATING_AFTER = "evaluating_after"
    AUDITING = "auditing"
    SAVING = "saving"
    UPLOADING = "uploading"


@dataclass
class StepInfo:
    """One optimizer step (or, for the demo builder, one epoch) and how the run goes."""

    step: int
    total_steps: int
    loss: float
    terms: dict[str, float]
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float | None  # None: no estimate (e.g. no known end)


class Events:
    """What a job reports while it runs. Override what you show; the rest is ignored."""

    def phase(self, name: str, detail: str | None = None) -> None:
        """Phase changes (`Phase`), or a step of a build such as the demo model's."""

    def step(self, info: StepInfo) -> None:
        """After every optimizer step."""

    def probe(self, step: int, result: dict[str, float]) -> None:
        """A stop-rule probe (forget and utility scores) or a builder's accuracy check."""

    def warning(self, message: str) -> None:
        """Something the user should know that does not stop the job (records that
        max_length cut or left out)."""

    def resumed(self, step: int) -> None:
        """The loop continued from a checkpoint at `step`."""

    def checkpoint(self, path: Path) -> None:
        """A checkpoint is complete on disk at `path` (e.g. to copy it off the machine)."""

    def should_cancel(self) -> bool:
        """Checked before every step: True stops the run with JobCancelled."""
        return False
