"""Registering webhooks and reading their deliveries (/v1/webhooks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from api.client.transport import Transport


class Webhooks(Transport):
    """The /v1/webhooks endpoints."""

    def create_webhook(
        self, url: str, event_types: list[str], *, description: str | None = None
    ) -> dict[str, Any]:
        """Register an endpoint; the answer's `secret` (whsec_...) is shown only here:
        verify deliveries with standardwebhooks.Webhook(secret).verify(body, headers)."""
        body = {"url": url, "event_types": event_types, "description": description}
        result: dict[str, Any] = self._json("POST", "/v1/webhooks", json=body, once_only=True)
        return result

    def list_webhooks(self) -> Iterator[dict[str, Any]]:
        return self._pages("/v1/webhooks", {}, None)

    def delete_webhook(self, webhook_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/v1/webhooks/{webhook_id}")
        return result

    def deliveries(self, webhook_id: str) -> Iterator[dict[str, Any]]:
        """The webhook's deliveries, newest first, each with every attempt."""
        return self._pages(f"/v1/webhooks/{webhook_id}/deliveries", {}, None)

    def redeliver(self, webhook_id: str, delivery_id: str) -> dict[str, Any]:
        path = f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
        result: dict[str, Any] = self._json("POST", path)
        return result
