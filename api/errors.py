"""One JSON error envelope for every failure: {"error": {code, message, param, request_id}}.

Domain errors carry their own code and status; FastAPI's request validation (422),
Starlette's 404/405 and anything unexpected (500) are mapped to the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import UnlearnError

log = logging.getLogger("api")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "file_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def envelope(
    request: Request,
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={
            "error": {"code": code, "message": message, "param": param, "request_id": request_id}
        },
    )


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(UnlearnError)
    async def _domain(request: Request, exc: UnlearnError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return envelope(request, exc.status, exc.code, exc.message, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first: dict[str, Any] = (
            dict(errors[0]) if errors else {"loc": (), "msg": "invalid request", "type": ""}
        )
        if first.get("type") == "json_invalid":
            return envelope(
                request,
                400,
                "invalid_json",
                f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            )
        messages = [f"{_loc(tuple(e['loc'])) or 'request'}: {e['msg']}" for e in errors[:5]]
        return envelope(
            request, 422, "invalid_request", "; ".join(messages), _loc(tuple(first["loc"]))
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return envelope(
            request, exc.status_code, code, message, headers=getattr(exc, "headers", None)
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
