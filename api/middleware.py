"""Pure ASGI middleware: a request id on every response (the caller's X-Request-ID if it
sent one), and one access-log line per request carrying it."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

log = logging.getLogger("api.access")


class RequestId:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if 0 < len(incoming) <= 200 else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s %s %.1fms %s",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
                request_id,
            )


class UploadLimit:
    """Cap the body of the upload route while it streams in: a declared Content-Length
    over the cap is refused before anything is read; a body that grows past it (chunked
    uploads) stops there. Either way the answer is the JSON 413 envelope."""

    def __init__(self, app: Any, *, path: str, max_bytes: int, slack: int = 64 * 1024):
        self.app, self.path, self.max_bytes, self.cap = app, path, max_bytes, max_bytes + slack

    def _error(self) -> Exception:
        from starlette.exceptions import HTTPException

        return HTTPException(
            413,
            f"the upload is larger than the limit of {self.max_bytes} bytes "
            "(MAX_UPLOAD_BYTES); split the file or ask the operator to raise it",
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.cap:
            scope.setdefault("state", {})["upload_too_large"] = True
        received = 0

        async def counted() -> dict:
            nonlocal received
            if scope.get("state", {}).get("upload_too_large"):
                raise self._error()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.cap:
                    raise self._error()
            return message

        await self.app(scope, counted, send)
