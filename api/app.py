"""The FastAPI application: `create_app(settings)`; `api.app:app` for uvicorn."""

from __future__ import annotations

import functools
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from api import errors
from api.auth import Authenticate, KeyCache, RateLimiter
from api.middleware import ConditionalGet, RequestGuard, RequestId
from api.queue import TaskQueue
from api.routes import evidence, files, jobs, meta
from api.schemas import ErrorEnvelope
from core.engine.methods import METHODS
from core.engine.spec import JobSpec
from core.service.db import make_engine, make_sessionmaker
from core.service.metadata import MAX_KEY_CHARS, MAX_KEYS, MAX_VALUE_CHARS
from core.service.settings import Settings, get_settings
from core.service.storage import make_store

DESCRIPTION = """Remove specific knowledge from a language model with CATNIP (calibrated,
tokenized negative preference alignment) and its baselines.

Upload a forget set (`POST /v1/files`), submit a job (`POST /v1/jobs`), poll it, and
download the unlearned adapter with before/after evidence. Every error is
`{"error": {"code", "message", "param", "request_id"}}`. Authenticate with
`Authorization: Bearer <key>`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.getLogger("api").setLevel(settings.log_level)
    engine = make_engine(settings.db_url, busy_timeout=settings.sqlite_busy_timeout_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.dispose()

    app = FastAPI(
        title="Unlearning service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={
            code: {"model": ErrorEnvelope}
            for code in (400, 401, 404, 408, 409, 413, 422, 429, 500, 503)
        },
    )
    app.state.settings = settings
    app.state.sessions = make_sessionmaker(engine)
    app.state.store = make_store(settings)
    app.state.queue = TaskQueue(settings)
    errors.install(app)
    # Outermost first: a request id on everything; the guard bounds the body and checks
    # the path before anything reads them; authentication and rate limits before any
    # route (and so before any body is read); ETags on what a route answers.
    app.add_middleware(ConditionalGet)
    app.add_middleware(
        Authenticate,
        settings=settings,
        sessions=app.state.sessions,
        cache=KeyCache(settings.auth_cache_seconds),
        limiter=RateLimiter(settings.rate_limit_storage),
    )
    app.add_middleware(
        RequestGuard,
        upload_paths=("/v1/files",),
        max_upload_bytes=settings.max_upload_bytes,
        max_json_bytes=settings.max_json_bytes,
        body_timeout=settings.body_timeout_seconds,
        upload_timeout=settings.upload_timeout_seconds,
    )
    app.add_middleware(RequestId)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(evidence.router)
    app.include_router(meta.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus JobCreate, whose `hyperparameters` is documented per method."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    params = {m.params for m in METHODS.values()}
    _, defs = models_json_schema(
        [(JobSpec, "validation"), *((p, "validation") for p in params)],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    job_create = dict(components.pop("JobSpec"))
    job_create["title"] = "JobCreate"
    by_method = "; ".join(
        f"`{m.id}` -> {m.params.__name__} ({m.summary})" for m in METHODS.values()
    )
    job_create["properties"]["hyperparameters"] = {
        "anyOf": [
            {"$ref": f"#/components/schemas/{p.__name__}"}
            for p in sorted(params, key=lambda p: p.__name__)
        ],
        "description": "Hyperparameters of the chosen method, defaults from the paper (A.4). "
        + by_method,
    }
    job_create["properties"]["method"]["enum"] = sorted(METHODS)
    job_create["properties"]["metadata"] = {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": MAX_VALUE_CHARS},
        "maxProperties": MAX_KEYS,
        "description": "Your map of strings (a ticket id...): returned with the job, "
        f"filterable in lists with metadata[key]=value; keys 1-{MAX_KEY_CHARS} letters, "
        "digits or _ . : -",
    }
    components["JobCreate"] = job_create
    app.openapi_schema = schema
    return schema


@functools.cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> Any:
    """`uvicorn api.app:app`: build the app from the environment on first use, once."""
    if name == "app":
        return _default_app()
    raise AttributeError(name)
