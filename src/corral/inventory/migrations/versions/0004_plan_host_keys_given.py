"""deployment nodes: when their SSH host private keys went out in a plan

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment_node") as batch:
        batch.add_column(sa.Column("host_keys_given", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_node") as batch:
        batch.drop_column("host_keys_given")
