"""HTTP protocols for uvicorn with a deadline on request headers, and one socket send per
response.

uvicorn times out idle keep-alive connections, but a connection that trickles its
request headers (or sends nothing at all) is held forever: these close it after
HEADER_TIMEOUT_SECONDS. uvicorn writes a response's head and its body as two transport
writes, each a `send` on the socket (on loopback, each also runs the receiver's side of
TCP); `CoalescingTransport` joins the writes of one turn of the event loop into one."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from core.service.settings import get_settings


class CoalescingTransport:
    """A transport whose writes are held until the end of the event loop's current turn
    and then written as one: a response's head and body, written by uvicorn one after
    the other without yielding, leave in one send. A later turn's writes are never
    held back by more than that turn, and once HOLD_BYTES are held they are written at
    once, so a response that writes chunk after chunk without yielding still meets the
    transport's flow control (uvicorn waits for the buffer to drain when it is full).
    `close` writes what is held first; everything else is the wrapped transport's."""

    HOLD_BYTES = 64 * 1024

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes >= self.HOLD_BYTES:
            self._flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._held_bytes = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeaderDeadline:
    """Closes the connection unless a request's headers are complete within the timeout of
    the connection opening, or of the previous response ending (keep-alive). Mixed in
    before a uvicorn protocol, which calls `_disarm` where its parser has the headers."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timeout: float | None = None  # None: HEADER_TIMEOUT_SECONDS of the environment
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[misc]
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
