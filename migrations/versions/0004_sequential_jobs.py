"""Sequential unlearning: the job a job starts from and the chain of jobs before it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("init_from_job_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("chain", sa.JSON(), nullable=True))
        batch_op.create_foreign_key(
            "fk_jobs_init_from_job_id", "jobs", ["init_from_job_id"], ["id"], ondelete="RESTRICT"
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_init_from_job_id", type_="foreignkey")
        batch_op.drop_column("chain")
        batch_op.drop_column("init_from_job_id")
