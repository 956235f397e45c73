"""The client's connection to one service: the API key, the error answers as APIError,
the retries (a dropped connection, 429 and 502/503/504, waiting what the server's
`Retry-After` says, else exponential backoff with jitter) and cursor-paginated lists."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Self

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

URL_ENV, KEY_ENV = "UNLEARN_API_URL", "UNLEARN_API_KEY"
RETRIED_STATUSES = (429, 502, 503, 504)


class APIError(Exception):
    """An error answer of the service: its HTTP status and the envelope's code, message,
    param and request id (quote that when reporting a problem)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" [{param}]" if param else ""))
        self.status, self.code, self.message = status, code, message
        self.param, self.request_id, self.retry_after = param, request_id, retry_after

    @classmethod
    def of(cls, response: httpx.Response) -> APIError:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        if not isinstance(error, dict):
            error = {}
        retry_after = response.headers.get("retry-after")
        return cls(
            response.status_code,
            str(error.get("code") or f"http_{response.status_code}"),
            str(error.get("message") or response.reason_phrase or response.text[:200]),
            param=error.get("param"),
            request_id=error.get("request_id") or response.headers.get("x-request-id"),
            retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
        )


class ChecksumError(Exception):
    """A downloaded artifact's sha256 is not the one the service recorded."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIError):
        return exc.status in RETRIED_STATUSES
    return isinstance(exc, httpx.TransportError)


def _only_unsent(exc: BaseException) -> bool:
    """For a request that must not run twice: retry only what the server did not act on
    (no connection made, refused by the rate limiter or while overloaded)."""
    if isinstance(exc, APIError):
        return exc.status in (429, 503)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


class _WaitRetryAfter:
    """The server's Retry-After when it sent one (capped), else exponential with jitter."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.backoff = wait_exponential_jitter(initial=0.5, max=cap)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, APIError) and exc.retry_after is not None:
            return min(exc.retry_after, self.cap)
        return self.backoff(state)


class Transport:
    """One service, one API key. `retries` is how many times a failed request is tried
    again; `timeout` is per request (seconds)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_wait: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = base_url or os.environ.get(URL_ENV)
        api_key = api_key or os.environ.get(KEY_ENV)
        if not base_url:
            raise ValueError(f"no service URL: pass base_url or set {URL_ENV}")
        if not api_key:
            raise ValueError(f"no API key: pass api_key or set {KEY_ENV}")
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "unlearn-client"},
            transport=transport,
        )
        self.retries, self.max_wait = retries, max_wait
        self.page_size = 100  # items per request when a list is walked

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    @property
    def base_url(self) -> str:
        return str(self.http.base_url).rstrip("/")

    def _retrying(self, *, once_only: bool = False) -> Retrying:
        return Retrying(
            retry=retry_if_exception(_only_unsent if once_only else _retryable),
            wait=_WaitRetryAfter(self.max_wait),
            stop=stop_after_attempt(self.retries + 1),
            reraise=True,
        )

    def _request(
        self, method: str, path: str, *, once_only: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """One call with retries; an error answer raises APIError."""
        for attempt in self._retrying(once_only=once_only):
            with attempt:
                response = self.http.request(method, path, **kwargs)
                if response.status_code >= 400:
                    raise APIError.of(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _pages(self, path: str, params: Mapping[str, Any], limit: int | None) -> Iterator[Any]:
        """Every item of a cursor-paginated list, page by page (at most `limit`)."""
        query = {k: v for k, v in params.items() if v is not None and k != "after"}
        seen = 0
        after = params.get("after")
        while True:
            page_size = self.page_size if limit is None else min(self.page_size, limit - seen)
            cursor = {"after": after} if after is not None else {}
            page = self._json("GET", path, params={**query, "limit": page_size, **cursor})
            for item in page["data"]:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    @staticmethod
    def _metadata_params(metadata: Mapping[str, str] | None) -> dict[str, str]:
        return {f"metadata[{k}]": v for k, v in (metadata or {}).items()}
