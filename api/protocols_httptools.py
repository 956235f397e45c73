"""api.protocols' header deadline on uvicorn's httptools protocol (the faster parser, which
the API image installs with uvicorn[standard]); imported only where httptools is."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.protocols import _HeaderDeadline


class HeaderTimeoutHttpTools(_HeaderDeadline, HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
