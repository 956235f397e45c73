"""Live event streams that cost one database poll per followed job, whatever the number
of streams: each job followed in this process has one feed, a task that polls the job's
new events every `EVENTS_POLL_SECONDS` into a bounded buffer, and every stream of that
job reads from it. A stream that starts (or falls) behind the buffer reads what it missed
from the database first, page by page, then joins the buffer; so each stream gets every
event after its `Last-Event-ID` once, in order, as when each polled on its own.

Event numbers are 1, 2, 3... within a job (`job_events.number`, unique per job), so the
buffer is a run of consecutive numbers: (start, start + len]. The status is read before
the events of the same poll (jobs.events_since), so a final status means no event will
follow those: the feed stops polling and its streams end once they have read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from api.metrics import EVENT_FEED_POLLS, EVENT_STREAMS, EVENT_STREAMS_REFUSED
from api.services import jobs
from core.errors import LimitExceeded, NotFound
from core.service.enums import TERMINAL_STATUSES

log = logging.getLogger(__name__)


@dataclass
class _Feed:
    job_id: str
    start: int  # the buffer holds the events numbered start + 1 ... start + len(events)
    status: str
    events: deque[jobs.StreamedEvent] = field(default_factory=deque)
    followers: int = 0
    gone: bool = False  # the job was deleted
    news: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def last(self) -> int:
        return self.start + len(self.events)

    @property
    def final(self) -> bool:
        return self.gone or self.status in TERMINAL_STATUSES

    def notify(self) -> None:
        """Wake every stream waiting on this feed (they wait on the Event they read
        before looking at the buffer, so none misses a notification)."""
        news, self.news = self.news, asyncio.Event()
        news.set()


class EventFeeds:
    """The feeds of this API process (app.state.feeds)."""

    def __init__(self, sessions: Any, poll_seconds: float, keep: int = 1000) -> None:
        self.sessions = sessions
        self.poll_seconds = poll_seconds
        self.keep = keep
        self._feeds: dict[str, _Feed] = {}
        self._starting: dict[str, asyncio.Task[_Feed]] = {}

    async def follow(
        self, job_id: str, after: int | None, idle_seconds: float | None = None
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """("events", the events after `after` as /events shows them, oldest first: all
        that are there when the stream reads, so a stream writes once per poll, not once
        per event), then ("end", the final status) once the job has one; nothing more if
        it is deleted. ("idle", None) after each `idle_seconds` without an event."""
        last = after or 0
        with EVENT_STREAMS.track_inprogress():
            async for item in self._follow(job_id, last, idle_seconds):
                yield item

    async def _follow(
        self, job_id: str, last: int, idle_seconds: float | None
    ) -> AsyncIterator[tuple[str, Any]]:
        async with self._following(job_id) as feed:
            while True:
                if last < feed.start:  # behind the buffer: what it missed, from the database
                    try:
                        events, _, _ = await run_in_threadpool(
                            jobs.events_since, self.sessions, job_id, last
                        )
                    except NotFound:  # the job was deleted meanwhile
                        return
                    if events:
                        yield "events", events
                    # the events up to feed.start exist: this ends
                    last = int(events[-1]["id"]) if events else feed.start
                    continue
                news = feed.news
                # A copy: the feed's task may add to the buffer while a yield waits.
                pending = [feed.events[i] for i in range(last - feed.start, len(feed.events))]
                if pending:
                    yield "events", pending
                    last = int(pending[-1]["id"])
                if feed.final and last >= feed.last:
                    if not feed.gone:
                        yield "end", feed.status
                    return
                if last >= feed.last:
                    try:
                        async with asyncio.timeout(idle_seconds):
                            await news.wait()
                    except TimeoutError:
                        yield "idle", None

    @contextlib.asynccontextmanager
    async def _following(self, job_id: str) -> AsyncIterator[_Feed]:
        feed = self._feeds.get(job_id)
        if feed is None:
            starting = self._starting.get(job_id)
            if starting is None:  # one start for the streams that arrive together
                starting = asyncio.create_task(self._start(job_id))
                self._starting[job_id] = starting
                starting.add_done_callback(lambda task: self._started(job_id, task))
            # Shielded: a stream that leaves meanwhile does not cancel the others' start.
            feed = await asyncio.shield(starting)
        feed.followers += 1
        try:
            yield feed
        finally:
            feed.followers -= 1
            if feed.followers == 0:
                self._drop(feed)

    async def _start(self, job_id: str) -> _Feed:
        """The job's feed, its buffer starting at the job's last event now."""
        status, number = await run_in_threadpool(jobs.last_event, self.sessions, job_id)
        feed = _Feed(job_id=job_id, start=number, status=status)
        if not feed.final:  # a finished job's streams read the database once and end
            feed.task = asyncio.create_task(self._poll(feed), name=f"feed {job_id}")
            self._feeds[job_id] = feed
        return feed

    def _started(self, job_id: str, task: asyncio.Task[_Feed]) -> None:
        del self._starting[job_id]
        if not task.cancelled():
            task.exception()  # retrieved here too: its streams may all have left

    def _drop(self, feed: _Feed) -> None:
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        if feed.task is not None:
            feed.task.cancel()

    async def _poll(self, feed: _Feed) -> None:
        while not feed.final:
            try:
                EVENT_FEED_POLLS.inc()
                events, status, more = await run_in_threadpool(
                    jobs.events_since, self.sessions, feed.job_id, feed.last
                )
            except NotFound:
                feed.gone = True
                feed.notify()
                return
            except Exception:  # a database hiccup: the streams wait, the feed tries again
                log.warning("polling the events of %s failed", feed.job_id, exc_info=True)
                await asyncio.sleep(self.poll_seconds)
                continue
            changed = bool(events) or status != feed.status
            feed.events.extend(events)
            # The oldest go beyond `keep`, never those of this poll: the streams that
            # were up to date have not read them yet.
            for _ in range(len(feed.events) - max(self.keep, len(events))):
                feed.events.popleft()
                feed.start += 1
            feed.status = status
            if changed:
                feed.notify()
            if not more and not feed.final:
                await asyncio.sleep(self.poll_seconds)
                if feed.followers == 0:  # its streams left while it started
                    if self._feeds.get(feed.job_id) is feed:
                        del self._feeds[feed.job_id]
                    return


class StreamSlots:
    """The event streams each tenant holds open in this API process (app.state.streams),
    at most `per_tenant` at once: one tenant's streams cannot fill the process's
    connections. The event loop is the only writer, so no lock is needed."""

    RETRY_AFTER_SECONDS = 10

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self.open: Counter[str] = Counter()

    def take(self, tenant: str) -> None:
        """One more stream for `tenant`, or LimitExceeded (429) at its limit."""
        if self.open[tenant] >= self.per_tenant:
            EVENT_STREAMS_REFUSED.inc()
            raise LimitExceeded(
                f"tenant {tenant!r} has {self.open[tenant]} event streams open, its limit "
                f"(MAX_STREAMS_PER_TENANT={self.per_tenant}); close one, or poll "
                "/v1/jobs/{id}/events",
                code="too_many_streams",
                retry_after=self.RETRY_AFTER_SECONDS,
            )
        self.open[tenant] += 1

    def give_back(self, tenant: str) -> None:
        self.open[tenant] -= 1
        if self.open[tenant] <= 0:
            del self.open[tenant]
