"""A job's artifacts: list, get by name, replace an earlier attempt's."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.service.db import Artifact


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
        ).all()
    )


def get_artifact(session: Session, job_id: str, name: str) -> Artifact:
    row = session.get(Artifact, (job_id, name))
    if row is None:
        names = [a.name for a in list_artifacts(session, job_id)]
        raise NotFound(
            f"job {job_id} has no artifact {name!r}; it has: {', '.join(names) or 'none yet'}",
            param="name",
            code="artifact_not_found",
        )
    return row


def replace_artifacts(session: Session, job_id: str, rows: list[Artifact]) -> None:
    """Store a job's artifact rows, replacing those of an earlier attempt."""
    for row in rows:
        existing = session.get(Artifact, (job_id, row.name))
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(row)
