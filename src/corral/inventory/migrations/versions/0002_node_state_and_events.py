"""node state and events

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:56:19.099007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=63), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=False),
        sa.Column("message", sa.String(length=4096), nullable=False),
        sa.Column("source", sa.String(length=45), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("node_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_event_node"), ["node"], unique=False)

    op.create_table(
        "node_state",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("message", sa.String(length=4096), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=True),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id"),
    )


def downgrade() -> None:
    op.drop_table("node_state")
    with op.batch_alter_table("node_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_event_node"))

    op.drop_table("node_event")
