"""Typed dependencies, defined once: settings, a DB session (commit at the boundary),
the artifact store, the task queue, the caller's tenant, and path-id loaders that
authorise as they load (another tenant's ids answer 404)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.queue import TaskQueue
from core.errors import UnlearnError
from core.service import repo
from core.service.db import File, Job
from core.service.settings import Settings
from core.service.storage import Store


class AuthError(UnlearnError):
    status = 401


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the route returns and before the response
    is sent (the dependency's scope is the route function): a commit that fails is the
    request's error, not a success that was never stored."""
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[Store, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]


class KeyCache:
    """Recently verified keys (by hash) -> tenant, for a few seconds, so a dashboard
    polling a job does not cost a key lookup per request. Only hits are cached."""

    def __init__(self, ttl_seconds: float, max_entries: int = 10_000):
        self.ttl, self.max_entries = ttl_seconds, max_entries
        self.entries: dict[str, tuple[str, float]] = {}

    def get(self, key_hash: str) -> str | None:
        hit = self.entries.get(key_hash)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, key_hash: str, tenant: str) -> None:
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key_hash] = (tenant, time.monotonic() + self.ttl)


def _lookup_tenant(sessions: sessionmaker, key_hash: str) -> str | None:
    with sessions() as session:
        return repo.tenant_for_key_hash(session, key_hash)


async def get_tenant(
    request: Request,
    authorization: Annotated[
        str | None,
        Header(description="`Bearer <key>`; keys come from `unlearn keys create --tenant T`."),
    ] = None,
) -> str:
    if not authorization:
        raise AuthError(
            "missing API key: send `Authorization: Bearer <key>` "
            "(an operator creates keys with `unlearn keys create --tenant T`)",
            code="missing_api_key",
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError("the Authorization header must be `Bearer <key>`", code="invalid_api_key")
    cache: KeyCache = request.app.state.key_cache
    key_hash = repo.hash_key(key)
    tenant = cache.get(key_hash)
    if tenant is None:
        tenant = await run_in_threadpool(_lookup_tenant, request.app.state.sessions, key_hash)
        if tenant is None:
            raise AuthError("invalid API key (unknown or revoked)", code="invalid_api_key")
        cache.put(key_hash, tenant)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def _load_job(sessions: sessionmaker, tenant: str, job_id: str) -> Job:
    with sessions() as session:
        return repo.get_job(session, tenant, job_id)


async def get_job_dep(
    request: Request,
    job_id: Annotated[str, Path(description="A job id, e.g. job-...")],
    tenant: TenantDep,
) -> Job:
    """The job, loaded and authorised in one trip to the database (a detached, read-only
    row: routes that change a job load it again in their own session)."""
    return await run_in_threadpool(_load_job, request.app.state.sessions, tenant, job_id)


def get_file_dep(
    file_id: Annotated[str, Path(description="A file id, e.g. file-...")],
    session: SessionDep,
    tenant: TenantDep,
) -> File:
    return repo.get_file(session, tenant, file_id)


JobDep = Annotated[Job, Depends(get_job_dep)]
FileDep = Annotated[File, Depends(get_file_dep)]
