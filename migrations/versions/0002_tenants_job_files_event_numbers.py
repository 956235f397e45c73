"""Tenants (per-tenant limits, and the row their checks lock), job_files (every file a job
names, so the database refuses to delete one in use), per-job event numbers (the ids
tenants see, instead of a sequence shared by every tenant).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

EVAL_SLOTS = ("forget_qa", "retain_qa", "forget_text", "retain_text", "forget_mc", "general_mc")


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("max_job_tokens", sa.BigInteger(), nullable=True),
        sa.Column("rate_limit", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    job_files = op.create_table(
        "job_files",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("slot", sa.String(length=32), nullable=False),
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["files.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "slot"),
    )
    with op.batch_alter_table("job_files", schema=None) as batch_op:
        batch_op.create_index("ix_job_files_file", ["file_id"], unique=False)
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("number", sa.Integer(), nullable=True))

    conn = op.get_bind()
    now = datetime.now(UTC)
    names = set()
    for table in ("api_keys", "files", "jobs"):
        names |= {row[0] for row in conn.execute(sa.text(f"SELECT DISTINCT tenant FROM {table}"))}
    if names:
        op.bulk_insert(
            tenants, [{"id": n, "created_at": now, "updated_at": now} for n in sorted(names)]
        )
    existing = {row[0] for row in conn.execute(sa.text("SELECT id FROM files"))}
    rows = []
    for job_id, spec in conn.execute(sa.text("SELECT id, spec FROM jobs")):
        spec = json.loads(spec) if isinstance(spec, str) else (spec or {})
        slots = {"forget_file": spec.get("forget_file"), "retain_file": spec.get("retain_file")}
        slots |= {f"eval.{k}": v for k, v in (spec.get("eval") or {}).items() if k in EVAL_SLOTS}
        rows += [
            {"job_id": job_id, "slot": k, "file_id": v} for k, v in slots.items() if v in existing
        ]
    if rows:
        op.bulk_insert(job_files, rows)
    conn.execute(
        sa.text(
            "UPDATE job_events SET number = (SELECT count(*) FROM job_events AS e "
            "WHERE e.job_id = job_events.job_id AND e.seq <= job_events.seq)"
        )
    )
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.alter_column("number", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_job_events_job_number", ["job_id", "number"])


def downgrade() -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_job_events_job_number", type_="unique")
        batch_op.drop_column("number")
    with op.batch_alter_table("job_files", schema=None) as batch_op:
        batch_op.drop_index("ix_job_files_file")
    op.drop_table("job_files")
    op.drop_table("tenants")
