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
Responses are the API's JSON objects as dicts, typed below for editors and mypy."""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import httpx
from httpx_sse import connect_sse
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

URL_ENV, KEY_ENV = "UNLEARN_API_URL", "UNLEARN_API_KEY"
TERMINAL = ("succeeded", "failed", "cancelled")
RETRIED_STATUSES = (429, 502, 503, 504)
# Each file slot of a job spec and the purpose its upload needs (the service's
# core.service.enums.FILE_SLOTS; a test keeps the two equal).
FILE_SLOTS: dict[str, str] = {
    "forget_file": "forget",
    "retain_file": "retain",
    "contrast_file": "contrast",
    **{
        f"eval.{name}": "eval"
        for name in (
            "forget_qa",
            "retain_qa",
            "forget_text",
            "retain_text",
            "forget_mc",
            "general_mc",
            "holdout",
        )
    },
}


class Problem(TypedDict):
    line: int | None
    field: str | None
    message: str


class Validation(TypedDict):
    kind: str | None
    records: int
    problems: list[Problem]
    problems_total: int
    summary: str


class File(TypedDict):
    id: str
    object: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    status: str
    kind: str | None
    records: int | None
    validation: Validation | None
    metadata: dict[str, str]
    created_at: str


class Progress(TypedDict):
    phase: str | None
    step: int
    total_steps: int | None
    fraction: float | None
    loss: float | None
    resumed_from_step: int | None


class JobError(TypedDict):
    code: str
    message: str


class Job(TypedDict):
    id: str
    object: str
    status: str
    method: str
    base_model: str
    forget_file: str
    retain_file: str | None
    contrast_file: str | None
    init_from_job: str | None
    metadata: dict[str, str]
    chain: list[str]
    worker_class: str | None
    adapter: dict[str, Any]
    hyperparameters: dict[str, Any]
    eval: dict[str, Any] | None
    progress: Progress
    metrics_summary: dict[str, Any] | None
    verdict: str | None
    error: JobError | None
    cancel_requested: bool
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None


class Event(TypedDict):
    id: str
    object: str
    type: str
    message: str
    data: dict[str, Any] | None
    created_at: str


class Artifact(TypedDict):
    name: str
    object: str
    kind: str
    filename: str
    bytes: int
    sha256: str
    created_at: str
    url: NotRequired[str]


class APIError(Exception):
    """An error answer of the service: its HTTP status and the envelope's code, message,
    param and request id (quote that when reporting a problem)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" [{param}]" if param else ""))
        self.status, self.code, self.message = status, code, message
        self.param, self.request_id, self.retry_after = param, request_id, retry_after

    @classmethod
    def of(cls, response: httpx.Response) -> APIError:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        if not isinstance(error, dict):
            error = {}
        retry_after = response.headers.get("retry-after")
        return cls(
            response.status_code,
            str(error.get("code") or f"http_{response.status_code}"),
            str(error.get("message") or response.reason_phrase or response.text[:200]),
            param=error.get("param"),
            request_id=error.get("request_id") or response.headers.get("x-request-id"),
            retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
        )


class ChecksumError(Exception):
    """A downloaded artifact's sha256 is not the one the service recorded."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIError):
        return exc.status in RETRIED_STATUSES
    return isinstance(exc, httpx.TransportError)


def _only_unsent(exc: BaseException) -> bool:
    """For a request that must not run twice: retry only what the server did not act on
    (no connection made, refused by the rate limiter or while overloaded)."""
    if isinstance(exc, APIError):
        return exc.status in (429, 503)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


class _WaitRetryAfter:
    """The server's Retry-After when it sent one (capped), else exponential with jitter."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.backoff = wait_exponential_jitter(initial=0.5, max=cap)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, APIError) and exc.retry_after is not None:
            return min(exc.retry_after, self.cap)
        return self.backoff(state)


class Client:
    """One service, one API key. `retries` is how many times a failed request is tried
    again; `timeout` is per request (seconds)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_wait: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = base_url or os.environ.get(URL_ENV)
        api_key = api_key or os.environ.get(KEY_ENV)
        if not base_url:
            raise ValueError(f"no service URL: pass base_url or set {URL_ENV}")
        if not api_key:
            raise ValueError(f"no API key: pass api_key or set {KEY_ENV}")
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "unlearn-client"},
            transport=transport,
        )
        self.retries, self.max_wait = retries, max_wait
        self.page_size = 100  # items per request when a list is walked

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    @property
    def base_url(self) -> str:
        return str(self.http.base_url).rstrip("/")

    # -- plumbing ------------------------------------------------------------------

    def _retrying(self, *, once_only: bool = False) -> Retrying:
        return Retrying(
            retry=retry_if_exception(_only_unsent if once_only else _retryable),
            wait=_WaitRetryAfter(self.max_wait),
            stop=stop_after_attempt(self.retries + 1),
            reraise=True,
        )

    def _request(
        self, method: str, path: str, *, once_only: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """One call with retries; an error answer raises APIError."""
        for attempt in self._retrying(once_only=once_only):
            with attempt:
                response = self.http.request(method, path, **kwargs)
                if response.status_code >= 400:
                    raise APIError.of(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _pages(self, path: str, params: Mapping[str, Any], limit: int | None) -> Iterator[Any]:
        """Every item of a cursor-paginated list, page by page (at most `limit`)."""
        query = {k: v for k, v in params.items() if v is not None and k != "after"}
        seen = 0
        after = params.get("after")
        while True:
            page_size = self.page_size if limit is None else min(self.page_size, limit - seen)
            cursor = {"after": after} if after is not None else {}
            page = self._json("GET", path, params={**query, "limit": page_size, **cursor})
            for item in page["data"]:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    @staticmethod
    def _metadata_params(metadata: Mapping[str, str] | None) -> dict[str, str]:
        return {f"metadata[{k}]": v for k, v in (metadata or {}).items()}

    # -- files -----------------------------------------------------------------------

    def upload_file(
        self,
        path: str | os.PathLike[str],
        purpose: str,
        *,
        metadata: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 600,
    ) -> File:
        """Upload a JSONL or .txt file. Large files are validated after the upload: with
        `wait` this returns once validation has finished (valid or invalid: look at
        `status` and `validation`)."""
        import json

        path = Path(path)
        data = {"purpose": purpose}
        if metadata:
            data["metadata"] = json.dumps(dict(metadata))
        response = None
        # An upload is not idempotent: retried only where the service did not take it.
        for attempt in self._retrying(once_only=True):
            with attempt, path.open("rb") as handle:
                response = self.http.post(
                    "/v1/files", data=data, files={"file": (path.name, handle)}
                )
                if response.status_code >= 400:
                    raise APIError.of(response)
        assert response is not None
        file: File = response.json()
        deadline = time.monotonic() + timeout
        while wait and file["status"] == "validating":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{file['id']} still validating after {timeout:.0f} s")
            time.sleep(0.5)
            file = self.get_file(file["id"])
        return file

    def get_file(self, file_id: str) -> File:
        result: File = self._json("GET", f"/v1/files/{file_id}")
        return result

    def list_files(
        self,
        *,
        purpose: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Iterator[File]:
        """Newest first, every page (or the first `limit`)."""
        return self._pages(
            "/v1/files", {"purpose": purpose, **self._metadata_params(metadata)}, limit
        )

    def delete_file(self, file_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/v1/files/{file_id}")
        return result

    # -- jobs ------------------------------------------------------------------------

    def submit_job(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """POST /v1/jobs. Retried submissions carry the same Idempotency-Key, so a retry
        after a lost answer returns the job created the first time."""
        key = idempotency_key or f"client-{uuid.uuid4()}"
        result: Job = self._json(
            "POST", "/v1/jobs", json=dict(spec), headers={"Idempotency-Key": key}
        )
        return result

    def upload_spec_files(
        self,
        spec: Mapping[str, Any],
        base_dir: str | os.PathLike[str] = ".",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A copy of `spec` in which every file slot naming a local file (relative to
        `base_dir`) holds the id of that file, uploaded with the slot's purpose. Ids and
        values that are no local file are left as they are. Raises ValueError naming the
        slot and the file's first problems if an upload is invalid."""
        spec = dict(spec)
        if isinstance(spec.get("eval"), Mapping):
            spec["eval"] = dict(spec["eval"])
        uploaded: dict[tuple[Path, str], str] = {}
        for slot, purpose in FILE_SLOTS.items():
            holder, key = (spec.get("eval"), slot[5:]) if slot.startswith("eval.") else (spec, slot)
            if not isinstance(holder, dict) or not isinstance(holder.get(key), str):
                continue
            path = Path(base_dir, holder[key]).expanduser()
            if not path.is_file():
                continue
            if (path, purpose) not in uploaded:
                file = self.upload_file(path, purpose, metadata=metadata)
                if file["status"] != "valid":
                    raise ValueError(f"{slot}: " + "; ".join(problems_of(file, path)))
                uploaded[(path, purpose)] = file["id"]
            holder[key] = uploaded[(path, purpose)]
        return spec

    def get_job(self, job_id: str) -> Job:
        """The job as it is now: past the server's status cache (`Cache-Control:
        no-cache`), so a script sees what it or the worker just changed."""
        result: Job = self._json("GET", f"/v1/jobs/{job_id}", headers={"Cache-Control": "no-cache"})
        return result

    def list_jobs(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """Newest first, every page (or the first `limit`)."""
        return self._pages("/v1/jobs", {"status": status, **self._metadata_params(metadata)}, limit)

    def cancel_job(self, job_id: str) -> Job:
        result: Job = self._json("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def metrics(self, job_id: str) -> dict[str, Any] | None:
        """The job's metrics (before/after, evidence, verdict); None until it has them."""
        result: dict[str, Any] | None = self._json("GET", f"/v1/jobs/{job_id}/metrics")["metrics"]
        return result

    def artifacts(self, job_id: str) -> list[Artifact]:
        result: list[Artifact] = self._json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]
        return result

    def certificate(self, job_id: str) -> bytes:
        """The signed certificate, byte for byte as signed (verify with `unlearn verify`)."""
        return self._request("GET", f"/v1/jobs/{job_id}/certificate").content

    def audit(self, *, after: int | None = None) -> Iterator[dict[str, Any]]:
        """The tenant's audit log, oldest first; each entry carries the hash of the one
        before (check the chain with `unlearn audit verify` on the operator's side)."""
        return self._pages("/v1/audit", {"after": after}, None)

    def signing_keys(self) -> list[dict[str, Any]]:
        """The public keys certificates are signed with (published: no key needed)."""
        result: list[dict[str, Any]] = self._json("GET", "/v1/signing-keys")["data"]
        return result

    # -- webhooks ------------------------------------------------------------------

    def create_webhook(
        self, url: str, event_types: list[str], *, description: str | None = None
    ) -> dict[str, Any]:
        """Register an endpoint; the answer's `secret` (whsec_...) is shown only here:
        verify deliveries with standardwebhooks.Webhook(secret).verify(body, headers)."""
        body = {"url": url, "event_types": event_types, "description": description}
        result: dict[str, Any] = self._json("POST", "/v1/webhooks", json=body, once_only=True)
        return result

    def list_webhooks(self) -> Iterator[dict[str, Any]]:
        return self._pages("/v1/webhooks", {}, None)

    def delete_webhook(self, webhook_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/v1/webhooks/{webhook_id}")
        return result

    def deliveries(self, webhook_id: str) -> Iterator[dict[str, Any]]:
        """The webhook's deliveries, newest first, each with every attempt."""
        return self._pages(f"/v1/webhooks/{webhook_id}/deliveries", {}, None)

    def redeliver(self, webhook_id: str, delivery_id: str) -> dict[str, Any]:
        path = f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
        result: dict[str, Any] = self._json("POST", path)
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/models")["data"]
        return result

    # -- events ----------------------------------------------------------------------

    def events(self, job_id: str, *, after: str | None = None) -> Iterator[Event]:
        """The events recorded so far, oldest first, after the event id `after`."""
        query: dict[str, Any] = {"after": after}
        return self._pages(f"/v1/jobs/{job_id}/events", query, None)

    def follow(
        self, job_id: str, *, after: str | None = None, poll_seconds: float = 1.0
    ) -> Iterator[Event]:
        """The job's events as they happen, oldest first, until it reaches a final status.
        Over the SSE stream, reconnecting with Last-Event-ID when the connection drops
        (no event missed, none twice); by polling the event list where the server has no
        stream."""
        last = after
        failures = 0
        while True:
            try:
                headers = {"Last-Event-ID": last} if last else {}
                with connect_sse(
                    self.http,
                    "GET",
                    f"/v1/jobs/{job_id}/events/stream",
                    headers=headers,
                    timeout=httpx.Timeout(self.http.timeout.connect, read=None),
                ) as source:
                    response = source.response
                    if response.status_code == 404 and self._no_stream_route(response):
                        yield from self._poll_events(job_id, last, poll_seconds)
                        return
                    if response.status_code >= 400:
                        response.read()
                        raise APIError.of(response)
                    for sse in source.iter_sse():
                        failures = 0
                        if sse.event == "end":
                            return
                        if not sse.data:  # a keep-alive without an event
                            continue
                        event: Event = sse.json()
                        last = event["id"]
                        yield event
            except (httpx.TransportError, APIError) as exc:
                if not _retryable(exc) or failures >= self.retries:
                    raise
                failures += 1
                time.sleep(min(self.max_wait, 0.5 * 2**failures))
                continue
            # The server closed the stream without `end` (a restart): carry on after `last`.
            if self.get_job(job_id)["status"] in TERMINAL:
                yield from self.events(job_id, after=last)
                return

    @staticmethod
    def _no_stream_route(response: httpx.Response) -> bool:
        response.read()
        try:
            return response.json()["error"]["code"] == "not_found"
        except (ValueError, KeyError, TypeError):
            return True

    def _poll_events(self, job_id: str, after: str | None, every: float) -> Iterator[Event]:
        while True:
            final = self.get_job(job_id)["status"] in TERMINAL
            for event in self.events(job_id, after=after):
                after = event["id"]
                yield event
            if final:
                return
            time.sleep(every)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], object] | None = None,
    ) -> Job:
        """Follow the job to a final status and return it (succeeded, failed or
        cancelled: look at `status` and `error`). `on_event` sees every event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.follow(job_id):
            if on_event is not None:
                on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still running after {timeout:.0f} s")
        return self.get_job(job_id)

    # -- artifacts -----------------------------------------------------------------

    def download_artifact(
        self,
        job_id: str,
        name: str,
        out_dir: str | os.PathLike[str],
        *,
        unpack: bool = True,
    ) -> Path:
        """Download an artifact (adapter, model, report) into `out_dir`, resuming a partial
        download left by an interrupted one (HTTP Range), and check its sha256. Returns the
        unpacked directory `out_dir/name`, or the archive with `unpack=False`."""
        artifact = next((a for a in self.artifacts(job_id) if a["name"] == name), None)
        if artifact is None:
            raise APIError(404, "artifact_not_found", f"job {job_id} has no artifact {name!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        archive = out / artifact["filename"]
        partial = archive.with_name(archive.name + ".part")
        resuming = Retrying(  # each try resumes where the last one's connection dropped
            retry=retry_if_exception_type(httpx.TransportError),
            wait=_WaitRetryAfter(self.max_wait),
            stop=stop_after_attempt(self.retries + 1),
            reraise=True,
        )
        for attempt in resuming:
            with attempt:
                self._fetch_to(job_id, artifact, partial)
        with partial.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != artifact["sha256"]:
            partial.unlink()
            raise ChecksumError(
                f"{name} of {job_id}: sha256 {digest} after download, the service recorded "
                f"{artifact['sha256']}; the partial file was removed, download it again"
            )
        partial.replace(archive)
        if not unpack:
            return archive
        target = out / name
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
        return target

    def _fetch_to(self, job_id: str, artifact: Artifact, partial: Path) -> None:
        """Bring `partial` to the artifact's full length: a Range request for what is
        missing, over the service or the presigned URL it redirects to."""
        have = partial.stat().st_size if partial.exists() else 0
        if have == artifact["bytes"]:
            return
        if have > artifact["bytes"]:
            partial.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{artifact["sha256"]}"'} if have else {}
        url = f"/v1/jobs/{job_id}/artifacts/{artifact['name']}"
        response = None
        for attempt in self._retrying():
            with attempt:
                request = self.http.build_request("GET", url, headers=headers)
                response = self.http.send(request, stream=True, follow_redirects=False)
                if response.status_code >= 400:
                    response.read()
                    response.close()
                    raise APIError.of(response)
        assert response is not None
        with httpx.Client(timeout=self.http.timeout) as plain:
            if response.is_redirect:
                # A presigned URL: no API key goes there, and its ETag is not the sha256.
                response.close()
                location = response.headers["location"]
                ranged = {"Range": f"bytes={have}-"} if have else {}
                response = plain.send(
                    plain.build_request("GET", location, headers=ranged), stream=True
                )
                if response.status_code >= 400:
                    response.read()
                    response.close()
                    raise APIError.of(response)
            try:
                mode = "ab" if response.status_code == 206 else "wb"
                with partial.open(mode) as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
            finally:
                response.close()


def problems_of(file: File, name: str | os.PathLike[str] | None = None) -> list[str]:
    """An invalid file's report as lines a person acts on: `NAME: line N, field F: what`."""
    name = name or file["filename"]
    validation = file["validation"]
    if validation is None:
        return [f"{name}: {file['status']}"]
    lines = []
    for problem in validation["problems"]:
        where = f"line {problem['line']}" if problem["line"] else "the file"
        field = f", field {problem['field']}" if problem["field"] else ""
        lines.append(f"{name}: {where}{field}: {problem['message']}")
    hidden = validation["problems_total"] - len(validation["problems"])
    if hidden > 0:
        lines.append(f"{name}: and {hidden} more problems")
    return lines or [f"{name}: {validation['summary']}"]
