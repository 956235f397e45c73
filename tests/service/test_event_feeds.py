"""Live event streams share one poll per job (api.event_feeds): many streams of one job,
some resuming from old events, one too slow for the buffer, each get every event after
their own Last-Event-ID once and in order, then the final status; the database is
polled per interval, not per stream. On SQLite and Postgres."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.service.conftest import add_job_row


def _job(sessions, status: str = "running") -> str:
    return add_job_row(sessions, f"job-{uuid.uuid4().hex[:24]}", status=status)


def _add(sessions, job_id: str, count: int, status: str | None = None) -> None:
    from sqlalchemy import update

    from core.service import repo
    from core.service.db import Job

    with sessions.begin() as session:
        for _ in range(count):
            repo.add_event(session, job_id, "message", "m")
        if status is not None:
            repo.add_event(session, job_id, "status", status)
            session.execute(update(Job).where(Job.id == job_id).values(status=status))


def _polls() -> float:
    """The feeds' database polls so far (the /metrics counter)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("unlearn_event_feed_polls_total")


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request, tmp_path):
    from core.service.db import make_engine, make_sessionmaker
    from core.service.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'feeds.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("migrated_pg")
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def flat(kind: str, item: Any) -> list[tuple[str, Any]]:
    """A feed's item as ("event", id) for each event of a batch, or (kind, item)."""
    if kind == "events":
        assert item, "an empty batch"
        return [("event", event["id"]) for event in item]
    return [(kind, item)]


@pytest.mark.timeout(120)  # a stream that never ends fails, not hangs
def test_streams_of_one_job_share_one_poll_and_each_gets_every_event_once(sessions):
    from prometheus_client import REGISTRY
    from sqlalchemy import event

    from api.event_feeds import EventFeeds

    job_id = _job(sessions)
    _add(sessions, job_id, 5)
    poll = 0.05
    feeds = EventFeeds(sessions, poll_seconds=poll, keep=4)
    queries: list[str] = []
    event.listen(
        sessions.kw["bind"],
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: (
            queries.append(statement)
            if statement.startswith("SELECT") and "ORDER BY job_events.number" in statement
            else None
        ),
    )
    afters = [None, 0, 2, 5, 40] * 8  # 40 streams; 40 is past every event the job will have

    async def read(after: int | None, slow: bool) -> list:
        seen = []
        async for kind, item in feeds.follow(job_id, after):
            seen.extend(flat(kind, item))
            if slow:  # falls behind the 4 events the buffer keeps
                await asyncio.sleep(0.1 * len(item) if kind == "events" else 0.1)
        return seen

    def streams() -> float:  # the /metrics gauge
        return REGISTRY.get_sample_value("unlearn_event_streams")

    open_before = streams()

    async def main() -> tuple[list[list], float]:
        readers = [asyncio.create_task(read(a, False)) for a in afters]
        readers.append(asyncio.create_task(read(None, True)))
        await asyncio.sleep(0.3)
        assert streams() == open_before + 41
        started = time.monotonic()
        for burst in (3, 12, 1, 6):
            await asyncio.to_thread(_add, sessions, job_id, burst)
            await asyncio.sleep(0.2)
        await asyncio.to_thread(_add, sessions, job_id, 2, "succeeded")
        seen = await asyncio.wait_for(asyncio.gather(*readers), 30)
        return seen, time.monotonic() - started

    queries.clear()
    polls_before = _polls()
    seen, elapsed = asyncio.run(main())
    polls = _polls() - polls_before
    last = 5 + 3 + 12 + 1 + 6 + 2 + 1
    for after, got in zip([*afters, None], seen, strict=True):
        expected = [("event", str(n)) for n in range((after or 0) + 1, last + 1)]
        assert got == [*expected, ("end", "succeeded")], after
    # One feed polled about once per interval for 41 streams, where each stream polling
    # on its own made 41 reads an interval. On top: one catch-up read by each of the 25
    # streams that began before the feed's first event, and the slow stream's (at least
    # one: the buffer had moved past it).
    assert polls <= elapsed / poll + 10, (polls, elapsed)
    catch_ups = len(queries) - polls - 25
    assert 1 <= catch_ups <= 10, (len(queries), polls)
    assert feeds._feeds == {}  # dropped with its last stream
    assert streams() == open_before


@pytest.mark.timeout(120)  # a stream that never ends fails, not hangs
def test_a_stream_of_a_finished_or_deleted_job_ends(sessions):
    from sqlalchemy import delete

    from api.event_feeds import EventFeeds
    from core.service.db import Job

    feeds = EventFeeds(sessions, poll_seconds=0.05)
    done = _job(sessions)
    _add(sessions, done, 2, "failed")

    async def read(job_id: str, after: int | None) -> list:
        return [
            seen async for kind, item in feeds.follow(job_id, after) for seen in flat(kind, item)
        ]

    polls_before = _polls()
    assert asyncio.run(read(done, 1)) == [("event", "2"), ("event", "3"), ("end", "failed")]
    assert _polls() == polls_before  # a finished job's feed never polls

    gone = _job(sessions)
    _add(sessions, gone, 1)

    async def delete_while_followed() -> list:
        reader = asyncio.create_task(read(gone, None))
        await asyncio.sleep(0.2)
        with sessions.begin() as session:
            session.execute(delete(Job).where(Job.id == gone))
        return await asyncio.wait_for(reader, 10)

    assert asyncio.run(delete_while_followed()) == [("event", "1")]

    running = _job(sessions)

    async def leave_while_it_starts() -> tuple[int, int]:
        reader = asyncio.create_task(read(running, None))
        await asyncio.sleep(0.001)  # the feed's start is in flight
        reader.cancel()
        await asyncio.sleep(0.5)  # ten intervals
        polls = _polls()
        await asyncio.sleep(0.5)
        return polls, _polls()

    polls_then, polls_later = asyncio.run(leave_while_it_starts())
    assert feeds._feeds == {} and polls_then == polls_later  # dropped, polling no more


@pytest.mark.timeout(120)
def test_a_stream_gets_a_poll_s_events_in_one_batch_and_idles_between(sessions):
    """An up-to-date stream gets what one poll found as one batch (one write to its
    client, not one per event), and ("idle", None) for each idle spell, which the route
    sends as an SSE comment: the heartbeat that keeps a quiet connection open."""
    from api.event_feeds import EventFeeds
    from api.routes.jobs import _sse

    job_id = _job(sessions)
    feeds = EventFeeds(sessions, poll_seconds=0.05)

    async def main() -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []

        async def read() -> None:
            async for kind, item in feeds.follow(job_id, None, idle_seconds=0.1):
                items.append((kind, [e["id"] for e in item] if kind == "events" else item))

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.35)  # quiet: about three idle spells
        await asyncio.to_thread(_add, sessions, job_id, 12)  # one transaction: one poll
        await asyncio.sleep(0.2)
        await asyncio.to_thread(_add, sessions, job_id, 0, "succeeded")
        await asyncio.wait_for(reader, 10)
        return items

    items = asyncio.run(main())
    quiet = items[: next(i for i, item in enumerate(items) if item[0] == "events")]
    assert 2 <= len(quiet) <= 4 and set(quiet) == {("idle", None)}, items
    batches = [item for item in items if item[0] == "events"]
    assert batches[0] == ("events", [str(n) for n in range(1, 13)]), items
    assert batches[-1] == ("events", ["13"]) and items[-1] == ("end", "succeeded"), items

    from api.services.jobs import StreamedEvent

    def event(number: int) -> StreamedEvent:
        shown = StreamedEvent(id=str(number), type="message")
        shown.frame = f"id: {number}\nevent: message\ndata: {{}}\n\n".encode()
        return shown

    async def sent() -> bytes:
        async def follow():  # what a feed yields, by hand
            yield "events", [event(1), event(2)]
            yield "idle", None
            yield "end", "failed"

        return b"".join([chunk async for chunk in _sse(follow(), idle_close=300.0)])

    assert asyncio.run(sent()) == (
        b"id: 1\nevent: message\ndata: {}\n\n"
        b"id: 2\nevent: message\ndata: {}\n\n"
        b": ping\n\n"
        b'event: end\ndata: {"status": "failed"}\n\n'
    )
