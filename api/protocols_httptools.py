"""api.protocols' header deadline on uvicorn's httptools protocol (the faster parser, which
the api extra installs); imported only where httptools is."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.protocols import _HeaderDeadline


class HeaderTimeoutHttpTools(_HeaderDeadline, HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._disarm()
