"""The audit log's hash chain on SQLite and on Postgres: intact as written; the database
refuses to change or remove an entry; and someone who bypasses that (drops the trigger,
edits the table) is caught by `unlearn audit verify`: an edited, a deleted, a reordered
entry, and a removed tail given the head recorded earlier."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core.service import audit
from core.service.db import make_engine, make_sessionmaker
from core.service.migrate import upgrade


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request, tmp_path):
    url = (
        request.getfixturevalue("migrated_pg")
        if request.param == "postgres"
        else f"sqlite:///{tmp_path / 'a.db'}"
    )
    upgrade(url)
    engine = make_engine(url)
    yield request.param, make_sessionmaker(engine)
    engine.dispose()


def _chain(sessions, tenant: str, n: int = 5) -> None:
    for i in range(n):
        with sessions.begin() as session:
            audit.append(
                session,
                tenant,
                actor="key-1",
                action="job.created",
                subject=f"job-{i}",
                request_id=f"req-{i}",
                data={"i": i},
            )


def _verify(sessions, tenant: str, head: str | None = None) -> list[str]:
    with sessions() as session:
        _, problems = audit.verify_all(session, tenant)
        if head is not None:
            entries = [audit.as_dict(e) for e in audit.entries_of(session, tenant)]
            problems += [p for p in audit.verify_chain(tenant, entries, head) if p.number is None]
    return [str(p) for p in problems]


def _bypass(session, backend: str) -> None:
    """What an attacker with the database's admin rights does first."""
    if backend == "postgres":
        session.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
    else:
        session.execute(text("DROP TRIGGER audit_log_no_update"))
        session.execute(text("DROP TRIGGER audit_log_no_delete"))


def _restore(session, backend: str) -> None:
    if backend == "postgres":
        session.execute(text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only"))


def test_the_chain_is_intact_and_the_database_refuses_changes(sessions):
    backend, maker = sessions
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    _chain(maker, tenant)
    assert _verify(maker, tenant) == []
    for statement in (
        "UPDATE audit_log SET subject = 'job-x' WHERE tenant = :t AND number = 2",
        "DELETE FROM audit_log WHERE tenant = :t AND number = 2",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            with maker.begin() as session:
                session.execute(text(statement), {"t": tenant})
    assert _verify(maker, tenant) == []


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (
            "UPDATE audit_log SET data = '{\"i\": 7}' WHERE tenant = :t AND number = 3",
            "entry 3: its content does not match",
        ),
        (
            "UPDATE audit_log SET actor = 'key-2' WHERE tenant = :t AND number = 1",
            "entry 1: its content does not match",
        ),
        (
            "DELETE FROM audit_log WHERE tenant = :t AND number = 3",
            "entry 4: expected entry 3: entries are missing",
        ),
        (
            "UPDATE audit_log SET number = 1000 WHERE tenant = :t AND number = 2; "
            "UPDATE audit_log SET number = 2 WHERE tenant = :t AND number = 4; "
            "UPDATE audit_log SET number = 4 WHERE tenant = :t AND number = 1000",
            "entries are out of order",
        ),
    ],
    ids=["edited-data", "edited-actor", "deleted", "reordered"],
)
def test_tampering_is_detected(sessions, tamper, expected):
    backend, maker = sessions
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    _chain(maker, tenant)
    with maker.begin() as session:
        _bypass(session, backend)
        for statement in tamper.split("; "):
            session.execute(text(statement), {"t": tenant})
    try:
        problems = _verify(maker, tenant)
        assert any(expected in p for p in problems), problems
    finally:
        with maker.begin() as session:
            _restore(session, backend)


def test_a_removed_tail_is_detected_against_a_recorded_head(sessions):
    backend, maker = sessions
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    _chain(maker, tenant)
    with maker() as session:
        head = audit.head(session, tenant)
    with maker.begin() as session:
        _bypass(session, backend)
        session.execute(
            text("DELETE FROM audit_log WHERE tenant = :t AND number = 5"), {"t": tenant}
        )
    try:
        assert _verify(maker, tenant) == []  # the chain alone cannot see a removed tail
        problems = _verify(maker, tenant, head)
        assert any("does not contain the expected head" in p for p in problems), problems
    finally:
        with maker.begin() as session:
            _restore(session, backend)


def test_a_recorded_head_is_a_point_the_chain_passes_not_its_end(sessions):
    """The log grows after a certificate records its head (downloads, later jobs): a head
    the chain passes through, unaltered, verifies; the genesis head too; an unknown head
    does not."""
    _, maker = sessions
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    _chain(maker, tenant)
    with maker() as session:
        with_three = [audit.as_dict(e) for e in audit.entries_of(session, tenant)[:3]]
        earlier = with_three[-1]["hash"]
    _chain(maker, tenant)  # more entries after the recorded head
    assert _verify(maker, tenant, earlier) == []
    assert _verify(maker, tenant, audit.GENESIS) == []
    problems = _verify(maker, tenant, "f" * 64)
    assert any("does not contain the expected head" in p for p in problems), problems
