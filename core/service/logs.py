"""Logs: one line per record on stderr, JSON for collectors or text for a terminal
(LOG_FORMAT: auto = text on a terminal, JSON otherwise), each carrying the request id,
tenant, key id and job id of the work in hand. Those come from a context variable: the
API's middleware binds the request id and the caller for each request, the job routes
the job id, the worker the job it runs; a record made anywhere below carries them."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

FIELDS = ("request_id", "tenant", "key_id", "job_id")
_OUTSIDE: dict[str, str] = {}  # the fields outside any bound() block: none, never changed
_context: ContextVar[dict[str, str]] = ContextVar("log_context", default=_OUTSIDE)


def bind(**fields: str | None) -> None:
    """Add fields to the innermost bound() block (a request's, a job's) for the rest of
    it: the block's own record is updated, so code around the call, inside the block,
    sees them too (the request-id middleware's access line, written after the route)."""
    new = {k: v for k, v in fields.items() if v}
    current = _context.get()
    if current is _OUTSIDE:
        _context.set(new)
    else:
        current.update(new)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Fields on every record made inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, str]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Puts the context's fields on each record the handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        return f"{line} {extra}" if extra else line


def configure(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> logging.Handler:
    """Install the one handler on the root logger (replacing one installed before), at
    `level` for this service's loggers; libraries stay at WARNING."""
    from pythonjsonlogger.json import JsonFormatter

    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    handler._unlearn = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_unlearn", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("api", "worker", "core"):
        logging.getLogger(name).setLevel(level)
    return handler
