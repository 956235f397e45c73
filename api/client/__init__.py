"""The Python client of the unlearning service's REST API. It needs httpx and nothing of
the service (no torch, no database): `pip install unlearn-service` without extras.

    from api.client import Client
    client = Client()                      # UNLEARN_API_URL, UNLEARN_API_KEY
    forget = client.upload_file("forget.jsonl", "forget")
    job = client.submit_job({"method": "catnip", "base_model": "llama", "forget_file": forget["id"]})
    job = client.wait(job["id"], on_event=print)
    client.download_artifact(job["id"], "adapter", "out/")

Every request is retried on a dropped connection, 429 and 502/503/504, waiting what the
server's `Retry-After` says (else exponential backoff with jitter); job submissions carry
an `Idempotency-Key` (a new uuid unless given), so a retried submission is the same job.
Responses are the API's JSON objects as dicts, typed (in `objects`) for editors and mypy."""

from __future__ import annotations

from api.client.downloads import Downloads
from api.client.events import Events
from api.client.objects import (
    FILE_SLOTS,
    TERMINAL,
    Artifact,
    Event,
    File,
    Job,
    JobError,
    Problem,
    Progress,
    Validation,
    problems_of,
)
from api.client.transport import KEY_ENV, RETRIED_STATUSES, URL_ENV, APIError, ChecksumError
from api.client.webhooks import Webhooks


class Client(Events, Downloads, Webhooks):
    """One service, one API key. `retries` is how many times a failed request is tried
    again; `timeout` is per request (seconds). Its methods by area: files, jobs,
    webhooks, events, downloads (a module each); the connection in transport."""


__all__ = [
    "APIError",
    "Artifact",
    "ChecksumError",
    "Client",
    "Event",
    "FILE_SLOTS",
    "File",
    "Job",
    "JobError",
    "KEY_ENV",
    "Problem",
    "Progress",
    "RETRIED_STATUSES",
    "TERMINAL",
    "URL_ENV",
    "Validation",
    "problems_of",
]
