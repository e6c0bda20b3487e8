"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:22:21.207617
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "corral_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "distro",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("distro", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_distro_gen"), ["gen"], unique=False)

    op.create_table(
        "node",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_gen"), ["gen"], unique=False)

    op.create_table(
        "node_group",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("node_group", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_group_gen"), ["gen"], unique=False)

    op.create_table(
        "profile",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("profile", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_profile_gen"), ["gen"], unique=False)

    op.create_table(
        "sync_root",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=4096), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("path"),
    )
    op.create_table(
        "tombstone",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tombstone", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tombstone_gen"), ["gen"], unique=False)

    op.create_table(
        "interface",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=True),
        sa.Column("ip", sa.String(length=15), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ip"),
        sa.UniqueConstraint("mac"),
    )
    with op.batch_alter_table("interface", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_interface_node_id"), ["node_id"], unique=False)

    op.create_table(
        "sync_file",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("root_id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=63), nullable=False),
        sa.Column("path", sa.String(length=4096), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["root_id"], ["sync_root.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("root_id", "path"),
    )
    with op.batch_alter_table("sync_file", schema=None) as batch_op:
        batch_op.create_index("ix_sync_file_owner", ["root_id", "owner"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sync_file", schema=None) as batch_op:
        batch_op.drop_index("ix_sync_file_owner")

    op.drop_table("sync_file")
    with op.batch_alter_table("interface", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_interface_node_id"))

    op.drop_table("interface")
    with op.batch_alter_table("tombstone", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tombstone_gen"))

    op.drop_table("tombstone")
    op.drop_table("sync_root")
    with op.batch_alter_table("profile", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_profile_gen"))

    op.drop_table("profile")
    with op.batch_alter_table("node_group", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_group_gen"))

    op.drop_table("node_group")
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_gen"))

    op.drop_table("node")
    with op.batch_alter_table("distro", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_distro_gen"))

    op.drop_table("distro")
    op.drop_table("corral_meta")
