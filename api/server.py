"""The HTTP server: uvicorn, with what it lacks against slow clients. uvicorn times out
idle keep-alive connections, but a connection that trickles its request headers (or
sends nothing at all) is held forever: HEADER_TIMEOUT_SECONDS closes it. Concurrent
connections beyond MAX_CONNECTIONS are answered 503. Bodies are bounded in size and
time by api.middleware.RequestGuard.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.service.settings import Settings, get_settings


class _HeaderDeadline:
    """Closes the connection unless a request's headers are complete within the timeout of
    the connection opening, or of the previous response ending (keep-alive)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timeout: float | None = None  # None: HEADER_TIMEOUT_SECONDS of the environment
    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        timeout = self.header_timeout or get_settings().header_timeout_seconds
        self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

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


def _protocol(settings: Settings | None) -> Any:
    """The HTTP protocol: httptools' parser where it is installed, else h11's, with the
    header deadline of `settings` (None: of the environment, for worker processes)."""
    if importlib.util.find_spec("httptools") is None:
        base: Any = HeaderTimeoutH11
    else:
        from api.server_httptools import HeaderTimeoutHttpTools

        base = HeaderTimeoutHttpTools
    if settings is None:
        return f"{base.__module__}:{base.__name__}"
    return type(base.__name__, (base,), {"header_timeout": settings.header_timeout_seconds})


def options(settings: Settings, *, in_process: bool = True) -> dict[str, Any]:
    """The uvicorn settings the CLI and the images run the API with."""
    return {
        "http": _protocol(settings if in_process else None),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 16 * 1024,
        "log_level": "warning",
    }


def run(settings: Settings, *, host: str, port: int, workers: int = 1) -> None:
    """Serve the API: in this process, or in `workers` processes (each builds the app from
    the environment, as `uvicorn api.app:app` would)."""
    if workers > 1:
        uvicorn.run(
            "api.app:app",
            host=host,
            port=port,
            workers=workers,
            **options(settings, in_process=False),
        )
        return
    from api.app import create_app

    uvicorn.Server(
        uvicorn.Config(create_app(settings), host=host, port=port, **options(settings))
    ).run()
