"""/v1/webhooks: a tenant's endpoints for push notifications, their deliveries (each
attempt recorded) and redelivery. Sending is the workers' (core.service.webhooks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from api.deps import CURSOR_PATTERN, SessionDep, SettingsDep, TenantDep, WhoDep
from api.schemas import (
    DeliveryObject,
    ListResponse,
    WebhookCreate,
    WebhookDeleted,
    WebhookObject,
)
from core.service import audit, repo, webhooks
from core.service.db import Webhook, WebhookDelivery

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookObject,
    summary="Register an endpoint; the answer shows its signing secret, once",
)
def create_webhook(
    body: WebhookCreate, session: SessionDep, who: WhoDep, settings: SettingsDep
) -> WebhookObject:
    row = webhooks.create(
        session, settings, who.tenant, body.url, body.event_types, body.description
    )
    audit.record(session, who, "webhook.created", row.id, {"url": row.url})
    return WebhookObject.of(row, secret=True)


@router.get("", response_model=ListResponse[WebhookObject], summary="Your webhooks, newest first")
def list_webhooks(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
) -> ListResponse[WebhookObject]:
    rows, more = repo.page(
        session, Webhook, [Webhook.tenant == tenant], limit, after, "webhook_not_found"
    )
    return ListResponse.page([WebhookObject.of(r) for r in rows], more)


@router.get("/{webhook_id}", response_model=WebhookObject, summary="One webhook")
def get_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> WebhookObject:
    return WebhookObject.of(webhooks.get(session, tenant, webhook_id))


@router.delete(
    "/{webhook_id}", response_model=WebhookDeleted, summary="Delete a webhook and its deliveries"
)
def delete_webhook(webhook_id: str, session: SessionDep, who: WhoDep) -> WebhookDeleted:
    row = webhooks.get(session, who.tenant, webhook_id)
    session.delete(row)
    session.flush()  # its deliveries go with it (ON DELETE CASCADE)
    audit.record(session, who, "webhook.deleted", webhook_id, {"url": row.url})
    return WebhookDeleted(id=webhook_id)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=ListResponse[DeliveryObject],
    summary="A webhook's deliveries, newest first, with every attempt",
)
def list_deliveries(
    webhook_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
) -> ListResponse[DeliveryObject]:
    hook = webhooks.get(session, tenant, webhook_id)
    rows, more = repo.page(
        session,
        WebhookDelivery,
        [WebhookDelivery.webhook_id == hook.id],
        limit,
        after,
        "delivery_not_found",
        key=WebhookDelivery.__table__.c.id,
    )
    return ListResponse.page([DeliveryObject.of(r) for r in rows], more)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver",
    response_model=DeliveryObject,
    summary="Send a delivery again, from the start of the retry schedule (same webhook-id)",
)
def redeliver(
    webhook_id: str, delivery_id: str, session: SessionDep, who: WhoDep
) -> DeliveryObject:
    hook = webhooks.get(session, who.tenant, webhook_id)
    row = webhooks.get_delivery(session, hook, delivery_id)
    webhooks.redeliver(session, row)
    audit.record(session, who, "webhook.redelivered", delivery_id, {"webhook": webhook_id})
    return DeliveryObject.of(row)
