"""Typed dependencies, defined once: settings, a DB session (commit at the boundary),
the artifact store, the task queue, the caller's tenant, and path-id loaders that
authorise as they load (another tenant's ids answer 404)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from sqlalchemy.orm import Session

from api.queue import TaskQueue
from core import repo
from core.db import File, Job
from core.errors import UnlearnError
from core.settings import Settings
from core.storage import LocalStore, S3Store


class AuthError(UnlearnError):
    status = 401


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_store(request: Request) -> LocalStore | S3Store:
    return request.app.state.store


def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[LocalStore | S3Store, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]


def get_tenant(session: SessionDep, authorization: Annotated[str | None, Header(
        description="`Bearer <key>`; keys come from `unlearn keys create --tenant T`.")] = None) -> str:
    if not authorization:
        raise AuthError("missing API key: send `Authorization: Bearer <key>` "
                        "(an operator creates keys with `unlearn keys create --tenant T`)",
                        code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("the Authorization header must be `Bearer <key>`", code="invalid_api_key")
    tenant = repo.tenant_for_key(session, key.strip())
    if tenant is None:
        raise AuthError("invalid API key (unknown or revoked)", code="invalid_api_key")
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def get_job_dep(job_id: Annotated[str, Path(description="A job id, e.g. job-...")],
                session: SessionDep, tenant: TenantDep) -> Job:
    return repo.get_job(session, tenant, job_id)


def get_file_dep(file_id: Annotated[str, Path(description="A file id, e.g. file-...")],
                 session: SessionDep, tenant: TenantDep) -> File:
    return repo.get_file(session, tenant, file_id)


JobDep = Annotated[Job, Depends(get_job_dep)]
FileDep = Annotated[File, Depends(get_file_dep)]
