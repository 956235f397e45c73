"""The HTTP server: uvicorn, with what it lacks against slow clients. uvicorn times out
idle keep-alive connections, but a connection that trickles its request headers (or
sends nothing at all) is held forever: HEADER_TIMEOUT_SECONDS closes it. Concurrent
connections beyond MAX_CONNECTIONS are answered 503. Bodies are bounded in size and
time by api.middleware.RequestGuard.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.service.settings import Settings, get_settings


@functools.cache
def _header_timeout() -> float:
    return get_settings().header_timeout_seconds


class _HeaderDeadline:
    """Closes the connection unless a request's headers are complete within the timeout of
    the connection opening, or of the previous response ending (keep-alive)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(_header_timeout(), self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class HeaderTimeoutH11(_HeaderDeadline, H11Protocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _httptools_protocol() -> str:
    if importlib.util.find_spec("httptools") is None:
        return "api.server:HeaderTimeoutH11"
    return "api.server_httptools:HeaderTimeoutHttpTools"


def options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings the CLI and the images run the API with."""
    return {
        "http": _httptools_protocol(),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 16 * 1024,
        "log_level": "warning",
    }


def run(settings: Settings, *, host: str, port: int, workers: int = 1) -> None:
    """Serve the API: in this process, or in `workers` processes (each builds the app from
    the environment, as `uvicorn api.app:app` would)."""
    if workers > 1:
        uvicorn.run("api.app:app", host=host, port=port, workers=workers, **options(settings))
        return
    from api.app import create_app

    uvicorn.Server(
        uvicorn.Config(create_app(settings), host=host, port=port, **options(settings))
    ).run()
