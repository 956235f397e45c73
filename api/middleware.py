"""Pure ASGI middleware: a request id on every response (the caller's X-Request-ID if it is
a sane one) with one access-log line per request; the guard that bounds what one
request may cost before any route reads it: the body's size (413) and time (408), and a
path or query string that is no text (400); ETags with 304s for GET's JSON; and a
short-lived cache of job status answers, so many dashboards polling one job cost one
query per interval."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from typing import Any
from urllib.parse import unquote_to_bytes

from api.errors import CodedHTTPException, send_error
from api.metrics import observe_request
from core.service import logs

log = logging.getLogger("api.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")


class RequestId:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with logs.bound(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
                seconds = time.perf_counter() - started
                observe_request(scope, status, seconds)
                log.info(
                    "%s %s %s %.1fms",
                    scope["method"],
                    raw_path.decode("ascii", "backslashreplace"),  # as sent: no control chars
                    status,
                    seconds * 1000,
                    extra={"status": status},  # the caller and the job: bound inside
                )


class RequestGuard:
    """Bounds one request before the app reads it:

    - the body: at most `max_upload_bytes` (plus multipart framing) on an upload route,
      `max_json_bytes` elsewhere; a declared Content-Length over it is refused before
      anything is read, a body that grows past it (chunked) stops there: 413;
    - its time: the whole body within `upload_timeout` on an upload route, `body_timeout`
      elsewhere, or 408 (slow clients do not hold a worker thread and memory forever);
    - the path and query string: a NUL or bytes that are not UTF-8 are no id or value any
      route takes: 400, before any query.
    """

    def __init__(
        self,
        app: Any,
        *,
        upload_paths: tuple[str, ...],
        max_upload_bytes: int,
        max_json_bytes: int,
        body_timeout: float,
        upload_timeout: float,
        upload_slack: int = 64 * 1024,
    ):
        self.app, self.upload_paths = app, upload_paths
        self.max_upload_bytes, self.max_json_bytes = max_upload_bytes, max_json_bytes
        self.body_timeout, self.upload_timeout = body_timeout, upload_timeout
        self.upload_slack = upload_slack

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = _not_text(scope)
        if problem:
            await send_error(scope, send, 400, "invalid_request", problem)
            return
        upload = scope["method"] == "POST" and scope["path"] in self.upload_paths
        limit = self.max_upload_bytes + self.upload_slack if upload else self.max_json_bytes
        shown = self.max_upload_bytes if upload else self.max_json_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        too_large = "file_too_large" if upload else "request_too_large"
        if declared.isdigit() and int(declared) > limit:
            await send_error(scope, send, 413, too_large, _too_large(upload, shown))
            return
        deadline = time.monotonic() + (self.upload_timeout if upload else self.body_timeout)
        received = 0
        body_done = False

        async def guarded() -> dict:
            nonlocal received, body_done
            if body_done:  # waiting for the client to leave (a stream, a download): no deadline
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except TimeoutError:
                raise CodedHTTPException(
                    408,
                    "request_timeout",
                    "the request body did not arrive in time; send it faster or in smaller parts",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise CodedHTTPException(413, too_large, _too_large(upload, shown))
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)


def _too_large(upload: bool, limit: int) -> str:
    if upload:
        return (
            f"the upload is larger than the limit of {limit} bytes (MAX_UPLOAD_BYTES); split "
            "the file or ask the operator to raise it"
        )
    return f"the request body is larger than the limit of {limit} bytes (MAX_JSON_BYTES)"


def _not_text(scope: dict) -> str | None:
    for part, raw in (
        ("path", scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass")),
        ("query string", scope.get("query_string", b"")),
    ):
        data = unquote_to_bytes(raw.replace(b"+", b" ")) if isinstance(raw, bytes) else raw
        if b"\x00" in data:
            return f"the {part} contains a NUL character"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return f"the {part} is not UTF-8 text"
    return None


class ConditionalGet:
    """ETag and If-None-Match for the JSON the API answers to GET: the ETag is a weak tag
    of the body's sha256, and a request whose If-None-Match names it gets a 304 without
    the body, so a dashboard that polls a job that has not changed receives a few
    headers. The body is still made (the route runs): what is saved is the transfer and
    the client's parsing. Other methods, statuses and media types (downloads, event
    streams) pass untouched; a route that sets its own ETag keeps it."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        wanted = dict(scope.get("headers") or []).get(b"if-none-match", b"").decode("latin-1")
        start: dict | None = None
        chunks: list[bytes] = []

        async def conditional_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                json_body = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] == 200 and json_body and b"etag" not in headers:
                    start = message  # held until the body is whole
                    return
                await send(message)
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                etag = f'W/"{hashlib.sha256(body).hexdigest()[:32]}"'
                kept = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                if etag_listed(wanted, etag):
                    await send(
                        {**start, "status": 304, "headers": [*kept, (b"etag", etag.encode())]}
                    )
                    await send({"type": "http.response.body", "body": b""})
                    return
                await send(
                    {**start, "headers": [*start.get("headers", []), (b"etag", etag.encode())]}
                )
                await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, conditional_send)


def etag_listed(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (or is `*`); tags compare weakly, by
    their opaque part, as RFC 9110 says for If-None-Match."""
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/")
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or opaque in tags


_JOB_PATH = re.compile(r"/v1/jobs/(job-[0-9a-f]{24})")


class StatusCache:
    """`GET /v1/jobs/{id}` answered from memory for `seconds` after the route made the
    answer, per tenant and job (a microcache): 200 dashboards polling one job once a
    second make one database query and one serialisation per interval, not 200. An
    answer is at most `seconds` old; a change made through this process (a cancel) drops
    its job's entry at once, and a request with `Cache-Control: no-cache` (the Python
    client's get_job; the dashboard after an event said the job changed) is answered
    fresh and refreshes the entry. Sits inside authentication (the tenant is known, rate
    limits apply) and inside ConditionalGet, which tags and 304s a cached answer as any
    other. 0 seconds: off."""

    def __init__(self, app: Any, seconds: float, max_entries: int = 10_000):
        self.app = app
        self.seconds = seconds
        self.max_entries = max_entries
        # (tenant, job id) -> (expires, response start, body, the route that made them)
        self.entries: dict[tuple[str, str], tuple[float, dict, bytes, Any]] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        caller = (scope.get("state") or {}).get("caller")
        if scope["type"] != "http" or caller is None or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        match = _JOB_PATH.fullmatch(path) if scope["method"] == "GET" else None
        if match is None:
            if scope["method"] != "GET" and path.startswith("/v1/jobs/"):
                self.entries.pop((caller.tenant, path.split("/")[3]), None)  # a cancel, say
            await self.app(scope, receive, send)
            return
        key = (caller.tenant, match.group(1))
        logs.bind(job_id=key[1])  # on the access line, as the route would
        entry = self.entries.get(key)
        fresh = b"no-cache" in dict(scope.get("headers") or []).get(b"cache-control", b"").lower()
        if entry is not None and not fresh and entry[0] >= time.monotonic():
            _, start, body, scope["route"] = entry  # the route: for the request metrics
            await send({**start, "headers": list(start["headers"])})
            await send({"type": "http.response.body", "body": body})
            return
        await self._answer_and_keep(scope, receive, send, key)

    async def _answer_and_keep(
        self, scope: dict, receive: Any, send: Any, key: tuple[str, str]
    ) -> None:
        """Run the route, passing its answer on as it comes, and keep a 200."""
        start: dict | None = None
        chunks: list[bytes] = []

        async def keep(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] == 200:
                start = {**message, "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    if len(self.entries) >= self.max_entries:
                        self.entries.pop(next(iter(self.entries)))  # the oldest filled
                    self.entries.pop(key, None)
                    expires = time.monotonic() + self.seconds
                    self.entries[key] = (expires, start, b"".join(chunks), scope.get("route"))
            await send(message)

        await self.app(scope, receive, keep)
