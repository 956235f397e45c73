"""Shared by every area: the readiness ping, cursor pagination and metadata filters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, select, text
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.service.db import looks_like_id


def ping(session: Session) -> None:
    """One round trip to the database (readiness)."""
    session.execute(text("SELECT 1"))


# Lists are newest first, ordered by (created_at, id); the cursor is the last item's id.
# `after` is the id the previous page ended with, like the managed fine-tuning APIs.
def page(
    session: Session,
    model: Any,
    filters: list[Any],
    limit: int,
    after: str | None,
    not_found: str,
    key: Any = None,
) -> tuple[list[Any], bool]:
    key = key if key is not None else model.id
    query = select(model).where(*filters)
    if after is not None:
        prefix = model.__tablename__.rstrip("s")  # files -> file, jobs -> job
        if key is getattr(model, "id", None) and not looks_like_id(prefix, after):
            raise NotFound(
                f"cursor {after!r} is not an id in this list", param="after", code=not_found
            )
        anchor = session.scalar(select(model).where(*filters, key == after))
        if anchor is None:
            raise NotFound(
                f"cursor {after!r} is not an id in this list", param="after", code=not_found
            )
        anchor_key = getattr(anchor, key.key)
        query = query.where(
            or_(
                model.created_at < anchor.created_at,
                and_(model.created_at == anchor.created_at, key < anchor_key),
            )
        )
    rows = session.scalars(
        query.order_by(model.created_at.desc(), key.desc()).limit(limit + 1)
    ).all()
    return list(rows[:limit]), len(rows) > limit


def metadata_filters(model: Any, metadata: dict[str, str] | None) -> list[Any]:
    """Each metadata[key] == value, on the JSON column (->> on Postgres, json_extract on
    SQLite)."""
    return [model.meta[key].as_string() == value for key, value in (metadata or {}).items()]
