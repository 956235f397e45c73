"""Domain errors with stable codes.

Every failure a user can cause is an `UnlearnError` with a `code` that tools can
match on, a `message` a person can act on (which file, which line, which field),
and optionally the `param` it concerns. The API maps these to one JSON envelope;
a failed job stores the code and the message.
"""

from __future__ import annotations


class UnlearnError(Exception):
    """Base class: `code` is stable, `message` is for people, `param` names the field."""

    code = "unlearn_error"
    status = 400
    retry_after: int | None = None  # seconds, where retrying later can succeed

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "param": self.param}


class SpecError(UnlearnError):
    """The job spec is invalid (unknown method, out-of-range hyperparameter...)."""

    code = "invalid_spec"
    status = 422


class DataError(UnlearnError):
    """A forget/retain/eval file cannot be used; the message names file, line and field."""

    code = "invalid_file"
    status = 422


class ModelError(UnlearnError):
    """A base model cannot be found or loaded."""

    code = "model_unavailable"
    status = 422


class DeviceError(UnlearnError):
    """The device a job was told to run on (--device, WORKER_DEVICE) is not here."""

    code = "device_unavailable"
    status = 503


class NotFound(UnlearnError):
    code = "not_found"
    status = 404


class Conflict(UnlearnError):
    """The request is valid but the resource's state forbids it (a finished job, a file in use)."""

    code = "conflict"
    status = 409


class Unavailable(UnlearnError):
    """A dependency (the queue, the store) is down; nothing was changed, retry later."""

    code = "unavailable"
    status = 503
    retry_after = 5


class LimitExceeded(UnlearnError):
    """A tenant's limit (active jobs, stored bytes, work per job) forbids this now."""

    code = "limit_exceeded"
    status = 429


class JobCancelled(UnlearnError):
    """Raised inside the loop when a cooperative cancel was requested."""

    code = "cancelled"
    status = 409
