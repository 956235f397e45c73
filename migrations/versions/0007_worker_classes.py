"""Worker classes: a model's size and declared needs, and the class a job is routed to.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parameters", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("needs_gb", sa.Float(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_class", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("worker_class")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("needs_gb")
        batch_op.drop_column("parameters")
