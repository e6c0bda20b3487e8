"""Database tables. Each entity keeps its validated spec as JSON; what the database
must enforce (unique names, MACs and IPs) or look up fast has a column of its own."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value counters; ``generation`` grows by one with every committed change."""

    __tablename__ = "corral_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class _Entity:
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    gen: Mapped[int] = mapped_column(Integer, index=True)


class Distro(_Entity, Base):
    __tablename__ = "distro"


class Profile(_Entity, Base):
    __tablename__ = "profile"


class Group(_Entity, Base):
    __tablename__ = "node_group"


class Node(_Entity, Base):
    __tablename__ = "node"
    interfaces: Mapped[list[Interface]] = relationship(
        back_populates="node",
        cascade="all, delete-orphan",
        order_by="Interface.position",
        lazy="selectin",
    )


class Interface(Base):
    __tablename__ = "interface"
    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str | None] = mapped_column(String(17), unique=True)
    ip: Mapped[str | None] = mapped_column(String(15), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    node: Mapped[Node] = relationship(back_populates="interfaces")


class Tombstone(Base):
    """A removed entity, so that an incremental sync can remove its files."""

    __tablename__ = "tombstone"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(63))
    gen: Mapped[int] = mapped_column(Integer, index=True)


class SyncRoot(Base):
    """A directory that ``corral sync`` maintains, and how far it is synced."""

    __tablename__ = "sync_root"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    gen: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64))


class SyncFile(Base):
    """A file written by ``corral sync``: its owner (a node, or '' for shared files)."""

    __tablename__ = "sync_file"
    __table_args__ = (
        UniqueConstraint("root_id", "path"),
        Index("ix_sync_file_owner", "root_id", "owner"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    root_id: Mapped[int] = mapped_column(ForeignKey("sync_root.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(63))
    path: Mapped[str] = mapped_column(String(4096))
    digest: Mapped[str] = mapped_column(String(64))


class NodeState(Base):
    """What a node is doing now (runtime, not part of its declared spec).

    ``state`` is ``armed`` (its next network boot installs it), ``installing``,
    ``installed`` or ``failed`` (both boot from the local disk until re-armed), or
    ``discovered`` (an unknown machine that reported itself).
    """

    __tablename__ = "node_state"
    node_id: Mapped[int] = mapped_column(
        ForeignKey("node.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[str] = mapped_column(String(16))
    # sha256 of the node's current token; the token itself is never stored.
    token_hash: Mapped[str | None] = mapped_column(String(64))
    phase: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(String(4096))
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    updated: Mapped[float] = mapped_column(Float)


class NodeEvent(Base):
    """One step in a node's history: a boot step corral served it (DHCP, TFTP, HTTP), a
    report of its own (installer callback, agent, discovery), or what corral decided (armed,
    failed by a timeout). An unknown machine's events have ``node`` "" and its ``mac``.
    A failure carries its ``reason`` (:data:`corral.agent.phases.REASONS`), the phase it
    ended (``during``) and the node's last log lines."""

    __tablename__ = "node_event"
    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(63), index=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    phase: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(String(4096))
    source: Mapped[str] = mapped_column(String(45))
    mac: Mapped[str | None] = mapped_column(String(17))
    deployment: Mapped[int | None] = mapped_column(Integer, index=True)
    reason: Mapped[str | None] = mapped_column(String(32))
    during: Mapped[str | None] = mapped_column(String(32))
    log: Mapped[str | None] = mapped_column(Text)


class Deployment(Base):
    """One ``corral deploy``: an image (or each node's own) onto a set of nodes; or, of
    ``kind`` ``diskless``, one boot of diskless nodes into their image (``corral boot``, or
    nodes that booted on their own within ``gather_until``: no session starts before it).

    ``state`` is ``running`` until every node has ended, then ``done`` (all done),
    ``failed`` (some failed) or ``cancelled``.
    """

    __tablename__ = "deployment"
    id: Mapped[int] = mapped_column(primary_key=True)
    created: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)
    noderange: Mapped[str] = mapped_column(String(4096))
    image: Mapped[str | None] = mapped_column(String(128))  # as asked; None: profiles'
    transport: Mapped[str] = mapped_column(String(32))  # as asked
    kind: Mapped[str] = mapped_column(String(16), default="install", server_default="install")
    gather_until: Mapped[float | None] = mapped_column(Float)
    nodes: Mapped[list[DeploymentNode]] = relationship(
        back_populates="deployment",
        cascade="all, delete-orphan",
        order_by="DeploymentNode.node",
        lazy="selectin",
    )


class DeploymentNode(Base):
    """A node's part in a deployment: what it gets and how far it is."""

    __tablename__ = "deployment_node"
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployment.id", ondelete="CASCADE"), index=True
    )
    node: Mapped[str] = mapped_column(String(63), index=True)
    image: Mapped[str] = mapped_column(String(128))  # NAME:VERSION
    transport: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(String(4096))
    log_tail: Mapped[str] = mapped_column(Text)
    powered: Mapped[float | None] = mapped_column(Float)  # when corral power-cycled it
    started: Mapped[float | None] = mapped_column(Float)  # first report
    updated: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    # when a plan carried the node's SSH host private keys: they go out once
    host_keys_given: Mapped[float | None] = mapped_column(Float)
    deployment: Mapped[Deployment] = relationship(back_populates="nodes")
