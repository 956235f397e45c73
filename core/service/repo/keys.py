"""API keys: creation, listing, revocation and the lookup that authenticates a caller."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFound, SpecError
from core.service.db import ApiKey, Tenant, new_id, utcnow
from core.service.repo.tenants import TENANT_NAME, lock_tenant

KEY_PREFIX = "ul_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for `tenant`; the plain key is returned once and never stored."""
    if not TENANT_NAME.fullmatch(tenant):
        raise SpecError(
            f"tenant {tenant!r}: use letters, digits and . _ - (at most 100, starting with a "
            "letter or digit)",
            param="tenant",
            code="invalid_tenant",
        )
    lock_tenant(session, tenant)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"), tenant=tenant, key_hash=hash_key(plain), prefix=plain[:10], name=name
    )
    session.add(row)
    return row, plain


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query).all())


def revoke_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}", param="key_id", code="key_not_found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def caller_for_key_hash(session: Session, key_hash: str) -> tuple[str, str, str | None] | None:
    """(tenant, key id, the tenant's rate limit or None for the default) of an active key,
    by the key's hash (`hash_key`)."""
    query = (
        select(ApiKey.tenant, ApiKey.id, Tenant.rate_limit)
        .outerjoin(Tenant, Tenant.id == ApiKey.tenant)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    )
    row = session.execute(query).first()
    return (row[0], row[1], row[2]) if row else None
