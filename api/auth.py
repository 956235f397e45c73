"""Who is calling, and whether they may now: the API key is checked and the tenant's rate
limit applied before any route runs, so nothing of a request's body is read for a caller
without a valid key, or over its limit.

Keys are looked up by their sha256 and cached for AUTH_CACHE_SECONDS (only hits are
cached). Rate limits are moving windows (the `limits` library), keyed by tenant, or by
client address for requests without a valid key; their counters live in Redis on the
stack, so every API process shares them, and in memory in the embedded default. Their
Redis connections come from a bounded pool that a request waits on (a burst of requests
queues for a connection rather than failing); Redis that is down or a pool that stays
exhausted is a 503, never a 500.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from api.errors import send_error
from core.service import logs, repo
from core.service.settings import Settings

log = logging.getLogger(__name__)

UNAVAILABLE = -1  # Authenticate._limited: the limiter could not answer (a 503 was sent)

# Paths under these prefixes need a key; the rest (health, docs, the schema) do not, nor
# the published public keys that verify certificates.
PROTECTED_PREFIXES = ("/v1/",)
PUBLIC_PATHS = ("/v1/signing-keys",)


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str
    rate_limit: str


class KeyCache:
    """Recently verified keys (by hash) -> caller, for a few seconds, so a dashboard
    polling a job does not cost a key lookup per request. Only hits are cached."""

    def __init__(self, ttl_seconds: float, max_entries: int = 10_000):
        self.ttl, self.max_entries = ttl_seconds, max_entries
        self.entries: dict[str, tuple[Caller, float]] = {}

    def get(self, key_hash: str) -> Caller | None:
        hit = self.entries.get(key_hash)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, key_hash: str, caller: Caller) -> None:
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key_hash] = (caller, time.monotonic() + self.ttl)


class RateLimitUnavailable(Exception):
    """The rate limit's storage could not be reached (or no connection to it came free)."""


# Connections from one API process to the rate limit's Redis (a request waits
# `rate_limit_wait_seconds` for one before it is a 503), and how long connecting may take.
RATE_LIMIT_CONNECTIONS, RATE_LIMIT_CONNECT_SECONDS = 32, 5.0


class RateLimiter:
    """Moving-window limits such as "20/second;600/minute"; `retry_after` is None when a
    request may go ahead (and counts it), else the seconds until it could;
    RateLimitUnavailable when the storage cannot answer."""

    def __init__(self, storage_uri: str, wait_seconds: float = 5.0):
        async_uri = storage_uri if storage_uri.startswith("async+") else f"async+{storage_uri}"
        options: dict[str, Any] = {"wrap_exceptions": True}
        if "redis" in async_uri.split("://")[0]:
            from redis.asyncio import BlockingConnectionPool

            pool = BlockingConnectionPool.from_url(
                async_uri.removeprefix("async+"),
                max_connections=RATE_LIMIT_CONNECTIONS,
                timeout=wait_seconds,
                socket_connect_timeout=RATE_LIMIT_CONNECT_SECONDS,
            )
            options.update(implementation="redispy", connection_pool=pool)
        self.limiter = MovingWindowRateLimiter(storage_from_string(async_uri, **options))
        self._parsed: dict[str, list[RateLimitItem]] = {}

    def _items(self, limit: str) -> list[RateLimitItem]:
        if limit not in self._parsed:
            self._parsed[limit] = parse_many(limit)
        return self._parsed[limit]

    async def retry_after(self, limit: str, key: str) -> int | None:
        try:
            return await self._retry_after(limit, key)
        except StorageError as exc:
            raise RateLimitUnavailable(str(exc.storage_error)) from exc

    async def _retry_after(self, limit: str, key: str) -> int | None:
        """Each limit in turn takes the request (one atomic check-and-count, one Redis
        round trip) until one refuses it, as Flask-Limiter does: a request that a later
        limit refuses still counts in the earlier ones' windows."""
        for item in self._items(limit):
            if not await self.limiter.hit(item, key):
                stats = await self.limiter.get_window_stats(item, key)
                return max(1, math.ceil(stats.reset_time - time.time()))
        return None


def _lookup(sessions: sessionmaker, key_hash: str, default_limit: str) -> Caller | None:
    with sessions() as session:
        found = repo.caller_for_key_hash(session, key_hash)
    if found is None:
        return None
    tenant, key_id, rate_limit = found
    return Caller(tenant, key_id, rate_limit or default_limit)


def is_cheap_read(scope: dict) -> bool:
    """A GET or HEAD that is not an artifact download: what dashboards poll, counted
    against READ_RATE_LIMIT; everything else against the tenant's RATE_LIMIT."""
    if scope["method"] not in ("GET", "HEAD"):
        return False
    parts = scope["path"].rstrip("/").split("/")  # "", v1, jobs, {id}, artifacts, {name}
    return not (len(parts) == 6 and parts[2] == "jobs" and parts[4] == "artifacts")


class Authenticate:
    """Pure ASGI middleware: `Authorization: Bearer <key>` on /v1/ routes, resolved to a
    tenant (scope state `caller`), and the rate limits (reads and writes with budgets of
    their own); 401, 429 or 503 before the route, and before the body is read."""

    def __init__(
        self,
        app: Any,
        *,
        settings: Settings,
        sessions: sessionmaker,
        cache: KeyCache,
        limiter: RateLimiter,
    ):
        self.app, self.settings, self.sessions = app, settings, sessions
        self.cache, self.limiter = cache, limiter

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any
    ) -> None:
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(PROTECTED_PREFIXES)
            or scope["path"] in PUBLIC_PATHS
        ):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        caller, problem = None, None
        if not header:
            problem = (
                "missing_api_key",
                "missing API key: send `Authorization: Bearer <key>` (an "
                "operator creates keys with `unlearn keys create --tenant T`)",
            )
        else:
            scheme, _, key = header.partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key:
                problem = ("invalid_api_key", "the Authorization header must be `Bearer <key>`")
            else:
                try:
                    caller = await self._caller(key)
                except SQLAlchemyError:
                    log.exception("key lookup failed")
                    await send_error(
                        scope,
                        send,
                        503,
                        "database_unavailable",
                        "the database is unavailable; retry shortly",
                        retry_after=5,
                    )
                    return
                if caller is None:
                    problem = ("invalid_api_key", "invalid API key (unknown or revoked)")
        if caller is None:
            # Failed authentications count against the client's address, so guessing keys
            # or flooding without one is limited too.
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = await self._limited(
                scope, send, self.settings.anonymous_rate_limit, f"ip:{client}"
            )
            if wait == UNAVAILABLE:
                return
            if wait is not None:
                await send_error(
                    scope,
                    send,
                    429,
                    "rate_limited",
                    f"too many requests without a valid key; retry in {wait} s",
                    retry_after=wait,
                )
                return
            assert problem is not None
            await send_error(
                scope, send, 401, problem[0], problem[1], headers={"WWW-Authenticate": "Bearer"}
            )
            return
        if is_cheap_read(scope):
            limit, bucket, name = self.settings.read_rate_limit, "tenant-read", "read rate limit"
        else:
            limit, bucket, name = caller.rate_limit, "tenant", "rate limit"
        wait = await self._limited(scope, send, limit, f"{bucket}:{caller.tenant}")
        if wait == UNAVAILABLE:
            return
        if wait is not None:
            await send_error(
                scope,
                send,
                429,
                "rate_limited",
                f"tenant {caller.tenant!r} is over its {name} ({limit}); retry in {wait} s",
                retry_after=wait,
            )
            return
        scope.setdefault("state", {})["caller"] = caller
        logs.bind(tenant=caller.tenant, key_id=caller.key_id)
        await self.app(scope, receive, send)

    async def _limited(self, scope: dict, send: Any, limit: str, key: str) -> int | None:
        """The limiter's retry_after; UNAVAILABLE, with the 503 sent, when it cannot say."""
        try:
            return await self.limiter.retry_after(limit, key)
        except RateLimitUnavailable as exc:
            log.error("rate limit storage unavailable: %s", exc)
            await send_error(
                scope,
                send,
                503,
                "rate_limit_unavailable",
                "the rate limit's storage (Redis) is unavailable; retry shortly",
                retry_after=5,
            )
            return UNAVAILABLE

    async def _caller(self, key: str) -> Caller | None:
        key_hash = repo.hash_key(key)
        caller = self.cache.get(key_hash)
        if caller is None:
            caller = await run_in_threadpool(
                _lookup, self.sessions, key_hash, self.settings.rate_limit
            )
            if caller is not None:
                self.cache.put(key_hash, caller)
        return caller
