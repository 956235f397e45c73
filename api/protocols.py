"""HTTP protocols for uvicorn with a deadline on request headers, and one socket send per
response.

uvicorn times out idle keep-alive connections, but a connection that trickles its
request headers (or sends nothing at all) is held forever: these close it after
HEADER_TIMEOUT_SECONDS. uvicorn writes a response's head and its body as two transport
writes, each a `send` on the socket (on loopback, each also runs the receiver's side of
TCP); `CoalescingTransport` joins the writes of one turn of the event loop into one.

uvicorn's `limit_concurrency` counts every open connection, idle ones too, so one client
holding a thousand half-sent requests made every tenant's request a 503: a connection
beyond MAX_CONNECTIONS_PER_CLIENT open from one address is answered 503 and closed before
it counts, and the others' requests go on being served. The 503 comes after a hold of a
couple of seconds, unread, so a client that reconnects whenever it is closed costs the
server a few connections a second, not thousands."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from api.metrics import CONNECTIONS_REFUSED
from core.service.settings import get_settings

_REFUSAL = b"too many connections from this address (MAX_CONNECTIONS_PER_CLIENT); retry later\n"
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 5\r\nconnection: close\r\n"
    b"content-length: " + str(len(_REFUSAL)).encode() + b"\r\n\r\n" + _REFUSAL
)


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
    the connection opening, or of the previous response ending (keep-alive), and refuses a
    connection beyond the per-client cap. Mixed in before a uvicorn protocol, which calls
    `_disarm` where its parser has the headers."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timeout: float | None = None  # None: HEADER_TIMEOUT_SECONDS of the environment
    # None: MAX_CONNECTIONS_PER_CLIENT of the environment; 0: no cap
    per_client: int | None = None
    # The connections open per client address, of the server this class serves (the
    # event loop's thread is the only one to change it).
    open_by_client: ClassVar[Counter[str]] = Counter()
    # Refused connections held before their 503, so a client that reconnects at once
    # does so a few times a second, not thousands; at most `max_held` of them.
    held: ClassVar[set[asyncio.BaseTransport]] = set()
    max_held: ClassVar[int] = 1000
    HOLD_SECONDS: ClassVar[float] = 2.0
    _header_timer: asyncio.TimerHandle | None = None
    _client_host: str | None = None
    _refused: asyncio.Transport | None = None
    _refusal_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        cap = self.per_client
        if cap is None:
            cap = get_settings().max_connections_per_client
        if host is not None and cap and self.open_by_client[host] >= cap:
            self._refuse(transport)
            return
        self._client_host = host
        if host is not None:
            self.open_by_client[host] += 1
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[misc]
        self._arm()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 and close, after HOLD_SECONDS unread where fewer than `max_held`
        are held: never counted by uvicorn, never parsed."""
        CONNECTIONS_REFUSED.inc()
        self._refused = transport
        if len(self.held) >= self.max_held:
            self._send_refusal()
            return
        transport.pause_reading()
        self.held.add(transport)
        self._refusal_timer = self.loop.call_later(self.HOLD_SECONDS, self._send_refusal)

    def _send_refusal(self) -> None:
        self._refusal_timer = None
        if self._refused is not None and not self._refused.is_closing():
            self._refused.write(REFUSED)
            self._refused.close()  # after the write

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:  # not a refused connection
            super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused is not None:  # uvicorn never saw it
            self.held.discard(self._refused)
            if self._refusal_timer is not None:
                self._refusal_timer.cancel()
            return
        self._disarm()
        if self._client_host is not None:
            self.open_by_client[self._client_host] -= 1
            if self.open_by_client[self._client_host] <= 0:
                del self.open_by_client[self._client_host]
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
