"""Reads of a tenant's audit log (core.service.audit writes it)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.service.db import AuditEntry


def list_audit(
    session: Session, tenant: str, *, limit: int, after: int | None
) -> tuple[list[AuditEntry], bool]:
    """The tenant's audit entries, oldest first; `after` is the last number seen."""
    query = select(AuditEntry).where(AuditEntry.tenant == tenant)
    if after is not None:
        query = query.where(AuditEntry.number > after)
    rows = session.scalars(query.order_by(AuditEntry.number).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit
