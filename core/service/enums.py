"""The names the API, the workers and the database share, defined once: statuses,
purposes, event types, and the task the API sends job ids to."""

from __future__ import annotations

from enum import StrEnum

from core.engine.formats import Kind
from core.engine.spec.parts import EVAL_FILE_KINDS, TRAIN_FILE_KINDS


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.EVALUATING)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class FileStatus(StrEnum):
    VALIDATING = "validating"
    VALID = "valid"
    INVALID = "invalid"
    DELETED = "deleted"  # a tombstone: the content is gone, the row stays as evidence


class Purpose(StrEnum):
    FORGET = "forget"
    RETAIN = "retain"
    CONTRAST = "contrast"
    DISTILL = "distill"  # robustify's distillation set: retain and general text
    EVAL = "eval"


# The file kinds (core.engine.formats) an upload of each purpose may hold: training sets
# take what the engine trains on; eval files also hold MC sets (and chat, kept valid).
PURPOSE_KINDS: dict[Purpose, tuple[Kind, ...]] = {
    Purpose.FORGET: TRAIN_FILE_KINDS,
    Purpose.RETAIN: TRAIN_FILE_KINDS,
    Purpose.CONTRAST: TRAIN_FILE_KINDS,
    Purpose.DISTILL: TRAIN_FILE_KINDS,
    Purpose.EVAL: tuple(
        dict.fromkeys(
            [*TRAIN_FILE_KINDS, *(k for kinds in EVAL_FILE_KINDS.values() for k in kinds)]
        )
    ),
}

# Each file slot of a job: the purpose its file must have been uploaded with, and the
# kinds it accepts (the engine's, core.engine.spec.parts).
FILE_SLOTS: dict[str, tuple[Purpose, tuple[Kind, ...]]] = {
    "forget_file": (Purpose.FORGET, TRAIN_FILE_KINDS),
    "retain_file": (Purpose.RETAIN, TRAIN_FILE_KINDS),
    "contrast_file": (Purpose.CONTRAST, TRAIN_FILE_KINDS),
    "distill_file": (Purpose.DISTILL, TRAIN_FILE_KINDS),
    **{f"eval.{name}": (Purpose.EVAL, kinds) for name, kinds in EVAL_FILE_KINDS.items()},
}


class EventType(StrEnum):
    PHASE = "phase"
    STEP = "step"
    PROBE = "probe"
    STATUS = "status"
    MESSAGE = "message"
    WARNING = "warning"


class ArtifactKind(StrEnum):
    PEFT_ADAPTER = "peft_adapter"
    HF_MODEL = "hf_model"
    REPORT = "report"


# The Celery task the API sends job ids to by name (it never imports the worker).
RUN_JOB_TASK = "unlearn.run_job"
