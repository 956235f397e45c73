"""/v1/models (registered base models), /v1/methods (the method registry), /healthz
(alive) and /readyz (dependencies up)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import sessionmaker

from api.deps import CURSOR_PATTERN, SessionDep, TenantDep
from api.schemas import ListResponse, MethodObject, ModelObject
from core.service import repo

log = logging.getLogger(__name__)
router = APIRouter()


@router.get(
    "/v1/models",
    response_model=ListResponse[ModelObject],
    tags=["models"],
    summary="Base models this deployment can unlearn from (registered by an operator)",
)
def list_models(
    session: SessionDep,
    _tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(pattern=CURSOR_PATTERN, description="The last id of the previous page.")
    ] = None,
) -> ListResponse[ModelObject]:
    rows, more = repo.list_models(session, limit=limit, after=after)
    return ListResponse.page([ModelObject.of(r) for r in rows], more)


@router.get(
    "/v1/methods",
    response_model=ListResponse[MethodObject],
    tags=["models"],
    summary="The unlearning methods, with their hyperparameters' schema and defaults",
)
def list_methods(_tenant: TenantDep) -> ListResponse[MethodObject]:
    from core.engine.spec.methods import METHODS

    return ListResponse.page([MethodObject.of(m) for m in METHODS.values()], False)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics: request latency, jobs by status, failures, stage times",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    from api.metrics import exposition

    body, content_type = exposition(request.app.state.metrics_registry)
    return Response(body, media_type=content_type)


@router.get("/healthz", tags=["health"], summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="The database, the store and the broker answer")
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", lambda: _db(state.sessions)),
        ("storage", state.store.check),
        ("broker", state.queue.ping),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # report, do not raise
            # The details (host, port, driver messages) are for the operator's log; an
            # anonymous caller learns which dependency is down, not where it lives.
            log.warning("readyz: %s: %s", name, exc)
            checks[name] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


def _db(sessions: sessionmaker) -> None:
    with sessions() as session:
        repo.ping(session)
