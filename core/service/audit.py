"""The tamper-evident audit log: every state-changing action, appended to its tenant's
hash chain. Entry n carries the sha256 of entry n-1 and its own hash over its content
and that link, so an edited, deleted or reordered entry breaks the chain where it was.
The operator's own actions (models registered) are the chain of tenant `_operator`.

Rows are only ever inserted (the database also refuses UPDATE and DELETE on the table:
migration 0003's triggers). Appending takes the tenant's row lock, so one tenant's
entries are numbered 1, 2, 3... without gaps. A deleted *last* entry leaves no gap:
check that the chain still contains a head recorded earlier (`unlearn audit verify
--head`; every certificate records the head at its issue); entries after it are the log
growing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.service import repo
from core.service.db import AuditEntry, utcnow
from core.service.signing import canonical

OPERATOR = "_operator"


@dataclass(frozen=True)
class Who:
    """Who acts: the tenant whose chain the entry joins, the actor (a key id, `operator`
    or `worker`) and the request it came with."""

    tenant: str
    actor: str
    request_id: str | None = None


def record(
    session: Session, who: Who, action: str, subject: str, data: dict[str, Any] | None = None
) -> AuditEntry:
    return append(
        session,
        who.tenant,
        actor=who.actor,
        action=action,
        subject=subject,
        request_id=who.request_id,
        data=data,
    )


GENESIS = "0" * 64


HASHED = ("tenant", "number", "at", "actor", "action", "subject", "request_id", "data", "prev_hash")


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of an entry's canonical JSON (RFC 8785): every field but its own hash, the
    time in ISO 8601 to the microsecond, data {} when empty."""
    at = entry["at"] if isinstance(entry["at"], datetime) else datetime.fromisoformat(entry["at"])
    content = {
        **{field: entry.get(field) for field in HASHED},
        "at": at.isoformat(timespec="microseconds"),
        "data": entry.get("data") or {},
    }
    return hashlib.sha256(canonical(content)).hexdigest()


def append(
    session: Session,
    tenant: str,
    *,
    actor: str,
    action: str,
    subject: str,
    request_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry to `tenant`'s chain (in the caller's transaction). It takes the
    tenant's row lock: callers that also lock files take the tenant's first, as job
    creation does, so two transactions never wait on each other in a circle."""
    repo.lock_tenant(session, tenant)
    last = session.scalar(
        select(AuditEntry)
        .where(AuditEntry.tenant == tenant)
        .order_by(AuditEntry.number.desc())
        .limit(1)
    )
    fields: dict[str, Any] = {
        "tenant": tenant,
        "number": (last.number + 1) if last else 1,
        "at": utcnow(),
        "actor": actor,
        "action": action,
        "subject": subject,
        "request_id": request_id,
        "data": data or {},
        "prev_hash": last.hash if last else GENESIS,
    }
    entry = AuditEntry(**fields, hash=entry_hash(fields))
    session.add(entry)
    session.flush()
    return entry


@dataclass
class Problem:
    tenant: str
    number: int | None
    message: str

    def __str__(self) -> str:
        where = f"entry {self.number}" if self.number is not None else "the chain"
        return f"{self.tenant}: {where}: {self.message}"


def verify_chain(
    tenant: str, entries: list[dict[str, Any]], head: str | None = None
) -> list[Problem]:
    """Every way `entries` (one tenant's, as stored, in the order read) is not the chain
    that was written: a gap in the numbers (a deleted entry), an entry out of order, a
    hash that does not match its content (an edit), a link that does not match the
    entry before it; and, given `head` (the head recorded at some point, such as a
    certificate's `audit_head`), a chain that does not pass through it: its entries up to
    that point were removed. Entries appended after the head are the log growing, not a
    problem."""
    problems = []
    previous_hash, expected = GENESIS, 1
    seen = {GENESIS}
    for entry in entries:
        number = entry["number"]
        if number != expected:
            what = "missing" if number > expected else "out of order"
            problems.append(
                Problem(tenant, number, f"expected entry {expected}: entries are {what}")
            )
        if entry["prev_hash"] != previous_hash:
            problems.append(Problem(tenant, number, "its link to the entry before does not match"))
        recomputed = entry_hash({**entry, "tenant": tenant})
        if recomputed != entry["hash"]:
            problems.append(Problem(tenant, number, "its content does not match its hash (edited)"))
        previous_hash, expected = entry["hash"], number + 1
        seen.add(previous_hash)
    if head is not None and head not in seen:
        problems.append(
            Problem(
                tenant,
                None,
                f"it does not contain the expected head {head[:16]}... (entries up to it "
                f"were removed from its end, or it is another chain; it ends at entry "
                f"{expected - 1})",
            )
        )
    return problems


def as_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "tenant": entry.tenant,
        "number": entry.number,
        "at": entry.at,
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "request_id": entry.request_id,
        "data": entry.data,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def verify_all(session: Session, tenant: str | None = None) -> tuple[int, list[Problem]]:
    """(entries read, problems) of every tenant's chain, or of one, from the database."""
    query = select(AuditEntry).order_by(AuditEntry.tenant, AuditEntry.id)
    if tenant is not None:
        query = query.where(AuditEntry.tenant == tenant)
    chains: dict[str, list[dict[str, Any]]] = {}
    count = 0
    for entry in session.scalars(query):
        chains.setdefault(entry.tenant, []).append(as_dict(entry))
        count += 1
    problems = []
    for name, entries in chains.items():
        problems += verify_chain(name, entries)
    return count, problems


def entries_of(session: Session, tenant: str) -> list[AuditEntry]:
    return list(
        session.scalars(
            select(AuditEntry).where(AuditEntry.tenant == tenant).order_by(AuditEntry.id)
        ).all()
    )


def head(session: Session, tenant: str) -> str:
    last = session.scalar(
        select(AuditEntry.hash)
        .where(AuditEntry.tenant == tenant)
        .order_by(AuditEntry.number.desc())
        .limit(1)
    )
    return last or GENESIS
