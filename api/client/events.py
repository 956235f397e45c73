"""A job's events: the recorded list, the live stream (SSE, resumed with Last-Event-ID),
and waiting for a final status."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse

from api.client.jobs import Jobs
from api.client.objects import TERMINAL, Event, Job
from api.client.transport import APIError, _retryable


class Events(Jobs):
    """The /v1/jobs/{id}/events endpoints."""

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
