"""The public keys that sign certificates, and the tenant's audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import SessionDep, TenantDep
from api.schemas import AuditEntryObject, ListResponse, SigningKeyObject
from core.service import certificates, repo

router = APIRouter()


@router.get(
    "/v1/signing-keys",
    response_model=ListResponse[SigningKeyObject],
    tags=["evidence"],
    summary="The public keys that sign certificates (Ed25519) and output models (ECDSA P-256), "
    "by key id (old keys included)",
)
def list_signing_keys(session: SessionDep) -> ListResponse[SigningKeyObject]:
    rows = certificates.public_keys(session)
    return ListResponse.page([SigningKeyObject.of(r) for r in rows], False)


@router.get(
    "/v1/audit",
    response_model=ListResponse[AuditEntryObject],
    tags=["evidence"],
    summary="The tenant's audit log, oldest first: each entry carries the sha256 of the one before",
)
def list_audit(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        int | None, Query(ge=0, le=2**31 - 1, description="The last entry number seen.")
    ] = None,
) -> ListResponse[AuditEntryObject]:
    rows, more = repo.list_audit(session, tenant, limit=limit, after=after)
    return ListResponse.page(
        [AuditEntryObject.of(r) for r in rows],
        more,
        empty_cursor=str(after) if after is not None else None,
    )
