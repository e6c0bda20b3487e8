"""node events as a history: the deployment, the MAC of unknown machines, and for a
failure its reason, the phase it ended and the node's last log lines; indexed by time for
``GET /api/v1/events?since=`` and retention

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_event") as batch:
        batch.add_column(sa.Column("mac", sa.String(17), nullable=True))
        batch.add_column(sa.Column("deployment", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reason", sa.String(32), nullable=True))
        batch.add_column(sa.Column("during", sa.String(32), nullable=True))
        batch.add_column(sa.Column("log", sa.Text(), nullable=True))
        batch.create_index("ix_node_event_time", ["time"])
        batch.create_index("ix_node_event_deployment", ["deployment"])


def downgrade() -> None:
    with op.batch_alter_table("node_event") as batch:
        batch.drop_index("ix_node_event_deployment")
        batch.drop_index("ix_node_event_time")
        for column in ("log", "during", "reason", "deployment", "mac"):
            batch.drop_column(column)
