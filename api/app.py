"""The FastAPI application: `create_app(settings)`; `api.app:app` for uvicorn."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from api import errors
from api.auth import PROTECTED_PREFIXES, PUBLIC_PATHS, Authenticate, KeyCache, RateLimiter
from api.event_feeds import EventFeeds, StreamSlots
from api.metrics import registry_for
from api.middleware import ConditionalGet, RequestGuard, RequestId, StatusCache
from api.queue import TaskQueue
from api.routes import dashboard, evidence, files, jobs, meta, webhooks
from api.schemas import ErrorEnvelope
from core.engine.spec import JobSpec
from core.engine.spec.methods import METHODS
from core.service import logs
from core.service.db import make_engine, make_sessionmaker, pool_capacity
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
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="Unlearning service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        # operation ids are the route functions' names (create_job, list_files, ...):
        # stable for generated clients, not FastAPI's create_job_v1_jobs_post
        generate_unique_id_function=lambda route: route.name,
        responses={
            code: {"model": ErrorEnvelope}
            for code in (400, 401, 404, 408, 409, 413, 422, 429, 500, 503)
        },
    )
    app.state.settings = settings
    app.state.sessions = make_sessionmaker(engine)
    app.state.session_gate = anyio.Semaphore(max(1, pool_capacity(engine) // 2))
    app.state.store = make_store(settings)
    app.state.queue = TaskQueue(settings)
    app.state.metrics_registry = registry_for(app.state.sessions)
    app.state.feeds = EventFeeds(app.state.sessions, settings.events_poll_seconds)
    app.state.streams = StreamSlots(settings.max_streams_per_tenant)
    errors.install(app)
    # Outermost first: a request id on everything; the guard bounds the body and checks
    # the path before anything reads them; authentication and rate limits before any
    # route (and so before any body is read); ETags on what a route answers; job status
    # answers kept for a moment.
    app.add_middleware(StatusCache, seconds=settings.status_cache_seconds)
    app.add_middleware(ConditionalGet)
    app.add_middleware(
        Authenticate,
        settings=settings,
        sessions=app.state.sessions,
        cache=KeyCache(settings.auth_cache_seconds),
        limiter=RateLimiter(settings.rate_limit_storage, settings.rate_limit_wait_seconds),
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
    app.include_router(webhooks.router)
    dashboard.install(app)
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
    job_create["examples"] = [JOB_EXAMPLE]
    job_create["properties"]["metadata"] = {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": MAX_VALUE_CHARS},
        "maxProperties": MAX_KEYS,
        "description": "Your map of strings (a ticket id...): returned with the job, "
        f"filterable in lists with metadata[key]=value; keys 1-{MAX_KEY_CHARS} letters, "
        "digits or _ . : -",
    }
    components["JobCreate"] = job_create
    _security(schema)
    _upload_example(schema)
    _event_streams(schema)
    app.openapi_schema = schema
    return schema


JOB_EXAMPLE: dict[str, Any] = {
    "method": "catnip",
    "base_model": "tiny-llama",
    "forget_file": "file-0123456789abcdef01234567",
    "adapter": {"type": "lora", "r": 8, "alpha": 16},
    "hyperparameters": {"learning_rate": 0.0003, "max_steps": 60, "batch_size": 32},
    "eval": {
        "forget_qa": "file-89abcdef0123456789abcdef",
        "retain_qa": "file-fedcba9876543210fedcba98",
        "utility_budget": 0.1,
    },
    "metadata": {"ticket": "T-4711"},
}


def _security(schema: dict[str, Any]) -> None:
    """The bearer key as the document's security scheme, required by every /v1 operation
    but the public ones (what api.auth guards), so Swagger's Authorize works."""
    schema["components"]["securitySchemes"] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `unlearn keys create` (ul_...).",
        }
    }
    for path, operations in schema["paths"].items():
        if path.startswith(PROTECTED_PREFIXES) and path not in PUBLIC_PATHS:
            for operation in operations.values():
                operation["security"] = [{"bearerAuth": []}]


def _event_streams(schema: dict[str, Any]) -> None:
    """FastAPI describes an SSE response with OpenAPI 3.2's `itemSchema`, which a 3.1
    document may not hold: a string schema says what the stream carries instead. Its
    errors are JSON envelopes, not streams."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if not code.startswith("2") and "text/event-stream" in content:
                    content["application/json"] = content.pop("text/event-stream")
                    continue
                stream = content.get("text/event-stream")
                if stream is not None and "itemSchema" in stream:
                    del stream["itemSchema"]
                    stream["schema"] = {
                        "type": "string",
                        "description": "Server-Sent Events: `id` the event number, `event` "
                        "its type, `data` the EventObject as JSON; last, an `end` event.",
                    }


def _upload_example(schema: dict[str, Any]) -> None:
    """An example for the one request body FastAPI builds from form fields (uploads)."""
    for component in schema["components"]["schemas"].values():
        properties = component.get("properties", {})
        if {"file", "purpose"} <= set(properties):
            component["examples"] = [
                {"file": "forget_qa.jsonl", "purpose": "forget", "metadata": '{"ticket": "T-4711"}'}
            ]


@functools.cache
def _default_app() -> FastAPI:
    """The app of `uvicorn api.app:app` (the images, `unlearn serve --workers N`), with
    the service's logging, as `unlearn serve` sets it up."""
    settings = get_settings()
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)


def __getattr__(name: str) -> Any:
    """`uvicorn api.app:app`: build the app from the environment on first use, once."""
    if name == "app":
        return _default_app()
    raise AttributeError(name)
