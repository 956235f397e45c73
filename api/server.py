"""The HTTP server: uvicorn, with what it lacks against slow clients. uvicorn times out
idle keep-alive connections, but a connection that trickles its request headers (or
sends nothing at all) is held forever: HEADER_TIMEOUT_SECONDS closes it. Connections
from one address beyond MAX_CONNECTIONS_PER_CLIENT are answered 503 and closed before
they count; concurrent connections beyond MAX_CONNECTIONS are answered 503. Bodies are bounded in size and
time by api.middleware.RequestGuard.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from typing import Any

import uvicorn

from api.protocols import HeaderTimeoutH11
from core.service.settings import Settings


def _protocol(settings: Settings | None) -> Any:
    """The HTTP protocol: httptools' parser where it is installed, else h11's, with the
    header deadline of `settings` (None: of the environment, for worker processes)."""
    if importlib.util.find_spec("httptools") is None:
        base: Any = HeaderTimeoutH11
    else:
        from api.protocols_httptools import HeaderTimeoutHttpTools

        base = HeaderTimeoutHttpTools
    if settings is None:
        return f"{base.__module__}:{base.__name__}"
    return type(
        base.__name__,
        (base,),
        {
            "header_timeout": settings.header_timeout_seconds,
            "per_client": settings.max_connections_per_client,
            "open_by_client": Counter(),  # this server's own count
            "held": set(),
            "max_held": settings.max_connections,
        },
    )


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
