"""HTTP protocols for uvicorn with a deadline on request headers: uvicorn times out idle
keep-alive connections, but a connection that trickles its request headers (or sends
nothing at all) is held forever. These close it after HEADER_TIMEOUT_SECONDS."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from core.service.settings import get_settings


class _HeaderDeadline:
    """Closes the connection unless a request's headers are complete within the timeout of
    the connection opening, or of the previous response ending (keep-alive). Mixed in
    before a uvicorn protocol, which calls `_disarm` where its parser has the headers."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timeout: float | None = None  # None: HEADER_TIMEOUT_SECONDS of the environment
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

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
    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:  # a request's headers are in
            self._disarm()
