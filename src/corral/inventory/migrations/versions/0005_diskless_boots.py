"""deployments: their kind (install or diskless boot) and a gathering window

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="install"))
        batch.add_column(sa.Column("gather_until", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment") as batch:
        batch.drop_column("gather_until")
        batch.drop_column("kind")
