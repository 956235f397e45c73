"""Webhooks, as the Standard Webhooks specification has them (standardwebhooks.com):
each delivery is a JSON body `{type, timestamp, data}` POSTed with `webhook-id`,
`webhook-timestamp` and `webhook-signature` (HMAC-SHA256 over `id.timestamp.body` with
the endpoint's `whsec_` secret, signed by the reference `standardwebhooks` package).

Deliveries are an outbox: `enqueue` inserts them in the same transaction as the change
they report (a job's status, a file's validation), so a crash cannot lose one. Workers
send them (`deliver_due`): each takes a lease on a due delivery with one conditional
UPDATE, so a sender that dies mid-request leaves it to another once the lease expires
(at-least-once: a receiver dedupes by `webhook-id`). Failures are retried on a schedule
of about a day, with jitter, and every attempt is recorded.

Targets on loopback, private, link-local or otherwise non-public addresses are refused
(at registration and again before every request, against DNS rebinding) unless the
operator allows them (WEBHOOK_ALLOW_PRIVATE)."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import random
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook as Signer

from core.service.db import Webhook, WebhookDelivery, new_id, utcnow
from core.service.settings import Settings

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "job.running",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "file.validated",
)
# Seconds to wait before each attempt after a failed one: Standard Webhooks' suggested
# schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h): about 27 hours in all.
SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)
PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
MAX_WEBHOOKS = 20  # per tenant
TIMEOUT_SECONDS = 10.0


class UnsafeTarget(ValueError):
    """A URL the service will not call."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def check_target(url: str, *, allow_private: bool) -> None:
    """Raise UnsafeTarget unless `url` is http(s) to a host whose every address is
    public (or the operator allows private ones)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeTarget(f"{url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise UnsafeTarget("the URL may not carry credentials; sign with the secret instead")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UnsafeTarget(f"{parts.hostname!r} does not resolve: {exc.strerror}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise UnsafeTarget(
                f"{parts.hostname!r} resolves to {address}, a loopback, private or reserved "
                "address; the operator must allow such targets (WEBHOOK_ALLOW_PRIVATE)"
            )


def enqueue(session: Session, tenant: str, event_type: str, data: dict[str, Any]) -> int:
    """One pending delivery per endpoint of `tenant` that wants `event_type`, in the
    caller's transaction. Returns how many."""
    hooks = session.scalars(select(Webhook).where(Webhook.tenant == tenant)).all()
    now = utcnow()
    count = 0
    for hook in hooks:
        if event_type not in hook.event_types:
            continue
        session.add(
            WebhookDelivery(
                id=new_id("msg"),
                webhook_id=hook.id,
                tenant=tenant,
                event_type=event_type,
                payload={"type": event_type, "timestamp": now.isoformat(), "data": data},
                status=PENDING,
                attempts=0,
                attempt_log=[],
                next_attempt_at=now,
                created_at=now,
            )
        )
        count += 1
    return count


def _claim(sessions: sessionmaker, owner: str, lease_seconds: float) -> str | None:
    """Lease one due delivery (pending, its time come, no live lease); its id or None."""
    now = utcnow()
    with sessions.begin() as session:
        candidates = session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
                or_(
                    WebhookDelivery.lease_expires_at.is_(None),
                    WebhookDelivery.lease_expires_at < now,
                ),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(5)
        ).all()
        for delivery_id in candidates:
            taken = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == PENDING,
                    or_(
                        WebhookDelivery.lease_expires_at.is_(None),
                        WebhookDelivery.lease_expires_at < now,
                    ),
                )
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:
                return delivery_id
    return None


def signed_request(delivery: WebhookDelivery, hook: Webhook) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt (a fresh timestamp each time)."""
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    stamp = utcnow()
    signature = Signer(hook.secret).sign(delivery.id, stamp, body.decode())
    return body, {
        "content-type": "application/json",
        "user-agent": "unlearn-webhooks",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": signature,
    }


def _send(settings: Settings, url: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    record: dict[str, Any] = {"at": utcnow().isoformat(), "status_code": None, "error": None}
    try:
        check_target(url, allow_private=settings.webhook_allow_private)
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers)
        record["status_code"] = response.status_code
        if not 200 <= response.status_code < 300:
            record["error"] = f"the endpoint answered {response.status_code}"
    except UnsafeTarget as exc:
        record["error"] = f"refused: {exc}"
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
    record["ms"] = round((time.monotonic() - started) * 1000)
    return record


def deliver_one(sessions: sessionmaker, settings: Settings, owner: str) -> bool:
    """Send one due delivery, if there is one, and record the attempt."""
    delivery_id = _claim(sessions, owner, settings.webhook_lease_seconds)
    if delivery_id is None:
        return False
    with sessions() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        hook = session.get(Webhook, delivery.webhook_id) if delivery else None
        if delivery is None or hook is None:  # deleted meanwhile
            return True
        url = hook.url
        body, headers = signed_request(delivery, hook)
    record = _send(settings, url, body, headers)
    schedule = settings.webhook_retry_schedule or SCHEDULE
    with sessions.begin() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.lease_owner != owner:
            return True  # deleted, or the lease was lost and another sender has it
        delivery.attempts += 1
        delivery.attempt_log = [*delivery.attempt_log, record]
        delivery.lease_owner, delivery.lease_expires_at = None, None
        if record["error"] is None:
            delivery.status, delivery.delivered_at = SUCCEEDED, utcnow()
        elif delivery.attempts > len(schedule):
            delivery.status = FAILED
        else:
            wait = schedule[delivery.attempts - 1] * random.uniform(0.8, 1.2)
            delivery.next_attempt_at = utcnow() + timedelta(seconds=wait)
    log.info(
        "webhook %s (%s) to %s: %s",
        delivery_id,
        headers["webhook-id"],
        url,
        record["error"] or record["status_code"],
    )
    return True


def deliver_due(sessions: sessionmaker, settings: Settings, owner: str, limit: int = 50) -> int:
    """Send what is due now (at most `limit`); how many were tried."""
    sent = 0
    while sent < limit and deliver_one(sessions, settings, owner):
        sent += 1
    return sent


def redeliver(session: Session, delivery: WebhookDelivery) -> None:
    """Send again from the start of the schedule (same webhook-id: receivers dedupe)."""
    delivery.status, delivery.attempts = PENDING, 0
    delivery.next_attempt_at = utcnow()
    delivery.lease_owner, delivery.lease_expires_at = None, None


# --- the tenant's side: registration, listing, redelivery ----------------------------


def create(
    session: Session,
    settings: Settings,
    tenant: str,
    url: str,
    event_types: list[str],
    description: str | None,
) -> Webhook:
    from core.errors import LimitExceeded, SpecError

    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown:
        raise SpecError(
            f"unknown event types {unknown}; valid: {', '.join(EVENT_TYPES)}", param="event_types"
        )
    try:
        check_target(url, allow_private=settings.webhook_allow_private)
    except UnsafeTarget as exc:
        raise SpecError(str(exc), param="url", code="unsafe_webhook_url") from None
    count = len(session.scalars(select(Webhook.id).where(Webhook.tenant == tenant)).all())
    if count >= MAX_WEBHOOKS:
        raise LimitExceeded(
            f"a tenant may register {MAX_WEBHOOKS} webhooks; delete one first",
            code="too_many_webhooks",
        )
    row = Webhook(
        id=new_id("webhook"),
        tenant=tenant,
        url=url,
        event_types=list(dict.fromkeys(event_types)),
        secret=new_secret(),
        description=description,
        created_at=utcnow(),
    )
    session.add(row)
    return row


def get(session: Session, tenant: str, webhook_id: str) -> Webhook:
    from core.errors import NotFound

    row = session.get(Webhook, webhook_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"no webhook {webhook_id!r}", param="webhook_id", code="webhook_not_found")
    return row


def get_delivery(session: Session, hook: Webhook, delivery_id: str) -> WebhookDelivery:
    from core.errors import NotFound

    row = session.get(WebhookDelivery, delivery_id)
    if row is None or row.webhook_id != hook.id:
        raise NotFound(
            f"no delivery {delivery_id!r} of {hook.id}",
            param="delivery_id",
            code="delivery_not_found",
        )
    return row
