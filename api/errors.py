"""One JSON error envelope for every failure: {"error": {code, message, param, request_id}}.

Domain errors carry their own code and status; FastAPI's request validation (422),
Starlette's 404/405, a database or broker that is down (503 with Retry-After) and
anything unexpected (500) are mapped to the same shape. The envelope is written in
ASCII JSON, so no value a request carried can make the error itself fail to encode.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import UnlearnError

log = logging.getLogger("api")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


class CodedHTTPException(StarletteHTTPException):
    """An HTTPException with one of our stable codes. Raised where FastAPI only lets
    HTTPExceptions through unchanged (inside the reading of a body, which turns any other
    exception into a 400 'error parsing the body')."""

    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(status_code, message)
        self.code = code


class ErrorResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _body(status: int, code: str, message: str, param: str | None, request_id: str | None) -> dict:
    return {"error": {"code": code, "message": message, "param": param, "request_id": request_id}}


def envelope(
    request: Request,
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return ErrorResponse(
        status_code=status, headers=headers, content=_body(status, code, message, param, request_id)
    )


async def send_error(
    scope: dict,
    send: Any,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    retry_after: int | None = None,
) -> None:
    """The envelope from pure ASGI middleware, before any route ran."""
    request_id = scope.get("state", {}).get("request_id")
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    response = ErrorResponse(
        status_code=status, headers=headers, content=_body(status, code, message, None, request_id)
    )
    await response(scope, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.disconnect"}


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first
    matching route's)."""
    methods: set[str] = set()
    for route in request.app.routes:
        path_regex = getattr(route, "path_regex", None)
        if path_regex is not None and path_regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def database_down(exc: SQLAlchemyError) -> bool:
    """Whether a database error is one to retry (a 503): the database could not be
    reached, or a transaction lost to another (a deadlock, a serialization failure, a
    lock wait that timed out), or no pooled connection came free in time (a burst larger
    than the pool), not a statement that was wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeout)


def install(app: FastAPI) -> None:
    @app.exception_handler(UnlearnError)
    async def _domain(request: Request, exc: UnlearnError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return envelope(request, exc.status, exc.code, exc.message, exc.param, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first: dict[str, Any] = (
            dict(errors[0]) if errors else {"loc": (), "msg": "invalid request", "type": ""}
        )
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", first["msg"])
            return envelope(
                request, 400, "invalid_json", f"the request body is not valid JSON: {detail}"
            )
        messages = [f"{_loc(tuple(e['loc'])) or 'request'}: {e['msg']}" for e in errors[:5]]
        return envelope(
            request, 422, "invalid_request", "; ".join(messages), _loc(tuple(first["loc"]))
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
            message = (
                f"{request.method} is not allowed on {request.url.path}; "
                f"allowed: {headers['Allow']}"
            )
        return envelope(request, exc.status_code, code, message, headers=headers or None)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if database_down(exc):
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
            return envelope(
                request,
                503,
                "database_unavailable",
                "the database is unavailable; nothing was changed, retry shortly",
                headers={"Retry-After": "5"},
            )
        log.exception("database error on %s %s", request.method, request.url.path)
        return envelope(
            request,
            500,
            "internal_error",
            "an unexpected error occurred; quote the request_id when reporting it",
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return envelope(
            request,
            500,
            "internal_error",
            "an unexpected error occurred; quote the request_id when reporting it",
        )
