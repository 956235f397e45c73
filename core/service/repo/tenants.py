"""Tenants: the name rule, the row and its write lock."""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.service.db import Tenant, utcnow

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def lock_tenant(session: Session, tenant: str) -> Tenant:
    """The tenant's row, created if missing, with its write lock held for the rest of the
    transaction (a no-op UPDATE first: row lock on Postgres, the database's write lock on
    SQLite), so checks of its limits and the inserts they guard cannot interleave."""
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    row = session.get(Tenant, tenant, populate_existing=True)
    if row is None:
        row = Tenant(id=tenant)
        session.add(row)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:  # created by a concurrent request: lock the one it made
            return lock_tenant(session, tenant)
    return row


def get_tenant(session: Session, tenant: str) -> Tenant | None:
    return session.get(Tenant, tenant)


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.id)).all())
