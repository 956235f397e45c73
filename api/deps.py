"""Typed dependencies, defined once: settings, a DB session (commit at the boundary),
the artifact store, the task queue, the caller's tenant, and path-id loaders that
authorise as they load (another tenant's ids answer 404)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.auth import Caller
from api.queue import TaskQueue
from core.errors import NotFound
from core.service import logs, repo
from core.service.audit import Who
from core.service.db import File, Job, looks_like_id
from core.service.settings import Settings
from core.service.storage import Store


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, committed when the route returns and before the response
    is sent (the dependency's scope is the route function): a commit that fails is the
    request's error, not a success that was never stored.

    A request keeps its session's connection while it waits for a thread (between a
    dependency and the route, and for the commit). With every connection of the pool so
    kept and every thread waiting for one, nothing moved: 400 concurrent requests on the
    embedded default got 15 answers, 115 503s when the pool's wait ran out, and 270 client
    timeouts. So at most half the pool's connections are held by request sessions
    (app.state.session_gate); the rest serve the short sessions that are opened and
    closed within one thread (keys, job loads, event polls), which always finish."""
    async with request.app.state.session_gate:
        session: Session = request.app.state.sessions()
        try:
            yield session
            await run_in_threadpool(session.commit)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(session.rollback)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(session.close)


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue


# What a list's `after` cursor may be: an id, or a registered model's name.
CURSOR_PATTERN = r"^[A-Za-z0-9._:/-]{1,200}$"

SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[Store, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key: `Authorization: Bearer <key>`; an operator creates keys with "
    "`unlearn keys create --tenant T`.",
)


def get_caller(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Caller:
    """The caller the authentication middleware resolved (api.auth): it has already
    answered 401 or 429 for requests without a valid key or over their limit."""
    caller: Caller | None = request.state.caller if hasattr(request.state, "caller") else None
    if caller is None:  # a /v1 route the middleware did not guard: a wiring fault
        raise RuntimeError("no authenticated caller on a protected route")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_tenant(caller: CallerDep) -> str:
    return caller.tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def get_who(request: Request, caller: CallerDep) -> Who:
    """Who acts, for the audit log: the tenant, the key and the request."""
    return Who(caller.tenant, caller.key_id, getattr(request.state, "request_id", None))


WhoDep = Annotated[Who, Depends(get_who)]


def _load_job(sessions: sessionmaker, tenant: str, job_id: str) -> Job:
    with sessions() as session:
        return repo.get_job(session, tenant, job_id)


async def get_job_dep(
    request: Request,
    job_id: Annotated[str, Path(pattern=r"^job-[0-9a-f]{24}$", description="A job id: job-...")],
    tenant: TenantDep,
) -> Job:
    """The job, loaded and authorised in one trip to the database (a detached, read-only
    row: routes that change a job load it again in their own session)."""
    if not looks_like_id("job", job_id):
        raise NotFound(f"no job {job_id!r}", param="job_id", code="job_not_found")
    job = await run_in_threadpool(_load_job, request.app.state.sessions, tenant, job_id)
    logs.bind(job_id=job.id)  # on the request's log lines, its access line included
    return job


def get_file_dep(
    file_id: Annotated[
        str, Path(pattern=r"^file-[0-9a-f]{24}$", description="A file id: file-...")
    ],
    session: SessionDep,
    tenant: TenantDep,
) -> File:
    if not looks_like_id("file", file_id):
        raise NotFound(f"no file {file_id!r}", param="file_id", code="file_not_found")
    return repo.get_file(session, tenant, file_id)


JobDep = Annotated[Job, Depends(get_job_dep)]
FileDep = Annotated[File, Depends(get_file_dep)]
