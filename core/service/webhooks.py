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

Targets on loopback, private, link-local, site-local or otherwise non-public addresses,
and IPv6 forms of such IPv4 addresses (NAT64, 6to4, Teredo, mapped, compatible), are
refused unless the operator allows them (WEBHOOK_ALLOW_PRIVATE): at registration, and
before every attempt, when the name is resolved once, checked, and the connection made
to the address checked (the Host header and TLS server name stay the name's), so a
second DNS answer cannot turn a request to a private address (DNS rebinding)."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 prefixes whose addresses carry an IPv4 address in their low 32 bits: the RFC 6052
# NAT64 prefix, IPv4-mapped, IPv4-translated (RFC 2765) and IPv4-compatible (deprecated).
_LOW_32_BITS_IPV4 = tuple(
    ipaddress.IPv6Network(prefix)
    for prefix in ("64:ff9b::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "::/96")
)
# NAT64 for a local network (RFC 8215): the embedded address's place is the operator's.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through: NAT64, mapped, translated,
    compatible, 6to4 (2002::/16) and Teredo (2001::/32, its server and its client)."""
    if any(address in network for network in _LOW_32_BITS_IPV4):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    return []


def refusal(address: Address) -> str | None:
    """Why `address` is no target for a webhook, or None where it is public. An IPv6
    address that embeds an IPv4 one is as public as that address, whatever
    `ipaddress.is_global` says of the IPv6 form."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "a site-local address"
        if address in _LOCAL_NAT64:
            return "a local-use NAT64 address"
        if not address.is_global:
            return "a loopback, private or reserved address"
        for inner in embedded_ipv4(address):
            reason = refusal(inner)
            if reason is not None:
                return f"an IPv6 form of {inner}, {reason}"
    if not address.is_global:
        return "a loopback, private or reserved address"
    return None


def check_target(url: str, *, allow_private: bool) -> list[Address]:
    """Raise UnsafeTarget unless `url` is http(s) to a host whose every address is
    public (or the operator allows private ones). Returns the addresses checked, in the
    resolver's order (none where private targets are allowed: nothing was resolved), so
    the caller connects to what was checked rather than resolving the name again."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeTarget(f"{url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise UnsafeTarget("the URL may not carry credentials; sign with the secret instead")
    if allow_private:
        return []
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UnsafeTarget(f"{parts.hostname!r} does not resolve: {exc.strerror}") from None
    addresses: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        reason = refusal(address)
        if reason is not None:
            raise UnsafeTarget(
                f"{parts.hostname!r} resolves to {address}, {reason}; the operator must "
                "allow such targets (WEBHOOK_ALLOW_PRIVATE)"
            )
        if address not in addresses:
            addresses.append(address)
    return addresses


def pinned(url: str, address: Address) -> tuple[str, dict[str, str], dict[str, Any]]:
    """`url` with its host replaced by `address`, the Host header it had, and (https) the
    TLS server name and certificate check of its host name: a connection to the address
    that was checked, which a second DNS answer cannot redirect."""
    parts = urlsplit(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"host": parts.netloc}, extensions


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


def _post(url: str, body: bytes, headers: dict[str, str], addresses: list[Address]) -> int:
    """POST to `url`, connecting to the first of `addresses` that accepts (to the name's
    own resolution where none were checked); the status code."""
    with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as client:

        def post_to(address: Address) -> int:
            target, host, extensions = pinned(url, address)
            request = client.build_request(
                "POST", target, content=body, headers={**headers, **host}, extensions=extensions
            )
            return client.send(request).status_code

        if not addresses:
            return client.post(url, content=body, headers=headers).status_code
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):
                return post_to(address)
        return post_to(addresses[-1])


def _send(settings: Settings, url: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    record: dict[str, Any] = {"at": utcnow().isoformat(), "status_code": None, "error": None}
    try:
        addresses = check_target(url, allow_private=settings.webhook_allow_private)
        status_code = _post(url, body, headers, addresses)
        record["status_code"] = status_code
        if not 200 <= status_code < 300:
            record["error"] = f"the endpoint answered {status_code}"
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
