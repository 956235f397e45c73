"""Registered base models and the references an operator pairs with them."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import SpecError
from core.service.db import RegisteredModel
from core.service.repo.common import page

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")


def add_model(
    session: Session,
    name: str,
    uri: str,
    description: str | None = None,
    *,
    digest: str | None = None,
    reference_for: str | None = None,
    parameters: int | None = None,
    needs_gb: float | None = None,
) -> RegisteredModel:
    """Register (or re-point) a base model. Names are what tenants type: letters, digits
    and ._:/- (at most 200)."""
    if not MODEL_NAME.fullmatch(name):
        raise SpecError(
            f"model name {name!r}: use letters, digits and . _ : / - (at most 200, "
            "starting with a letter or digit)",
            param="name",
            code="invalid_model_name",
        )
    row = session.get(RegisteredModel, name)
    if row is None:
        row = RegisteredModel(name=name, uri=uri, description=description)
        session.add(row)
    row.uri, row.description = uri, description
    row.digest, row.reference_for = digest, reference_for
    row.parameters, row.needs_gb = parameters, needs_gb
    return row


def list_models(
    session: Session, *, limit: int, after: str | None
) -> tuple[list[RegisteredModel], bool]:
    return page(
        session, RegisteredModel, [], limit, after, "model_not_found", key=RegisteredModel.name
    )


def get_model(session: Session, name: str) -> RegisteredModel:
    row = session.get(RegisteredModel, name)
    if row is None:
        names = session.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)).all()
        raise SpecError(
            f"unknown base_model {name!r}; registered models: "
            f"{', '.join(names) or 'none (an operator adds them with `unlearn models add`)'}",
            param="base_model",
            code="unknown_model",
        )
    return row


def find_model(session: Session, name: str) -> RegisteredModel | None:
    return session.get(RegisteredModel, name)


def reference_for(session: Session, base_model: str) -> RegisteredModel | None:
    """The model an operator registered as the reference for `base_model`, if any."""
    query = select(RegisteredModel).where(RegisteredModel.reference_for == base_model)
    return session.scalars(query.order_by(RegisteredModel.created_at.desc()).limit(1)).first()
