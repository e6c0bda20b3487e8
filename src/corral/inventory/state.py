"""What nodes are doing: install state, tokens, events and discovery.

A node's network boot installs it only while it is *armed*. When its install reports
success (or failure) it is disarmed and boots from its local disk until an
administrator re-arms it with ``corral node reinstall``: no node loops into
reinstalling itself.

The life cycle of a node (``state``, moved by the ``phase`` of what it reports)::

    armed ─booted─▶ installing ─install-finished (kickstart's %post)─────────▶ installed
                      │ └─rebooting | deployed (image on disk)─▶ deployed ─first-boot─▶ installed
                      └─failed─▶ failed ◀─first-boot timeout (rebooting, no call back)─┘

A diskless node does not install: each network boot makes it ``booting`` (when it
fetches its token), its agent loads the image into RAM and starts it (``starting``), and
the image's systemd, once at multi-user, makes it ``running``::

    any ─netboot (token)─▶ booting ─starting─▶ booting ─running─▶ running
                             └─failed─▶ failed ◀─no running report in firstboot_timeout─┘

An image install ends ``deployed``: the disk holds the image. Only the installed system's
own word, the ``first-boot`` event its corral unit posts with the node's token from the
node's address, makes it ``installed``. ``rebooting`` means the agent rebooted into it, so
silence past ``firstboot_timeout`` fails the node; ``deployed`` alone (the agent did not
reboot, or the image has no unit) waits for that word without a timer.

Tokens are random, issued when a node starts an install (with its kickstart, or in
its boot ramdisk) and only their sha256 is stored; they are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.agent import phases
from corral.errors import AlreadyExists, InvalidValue, LimitReached, NotFound, UsageError
from corral.inventory import models as m
from corral.inventory.schema import InterfaceSpec, NodeSpec, normalize_mac
from corral.inventory.store import Inventory

ARMED, INSTALLING, DEPLOYED, INSTALLED, FAILED, DISCOVERED = (
    "armed",
    "installing",
    "deployed",
    "installed",
    "failed",
    "discovered",
)
#: a diskless node: from its network boot until its image's systemd says it is up
BOOTING, RUNNING = "booting", "running"
#: Every state, in life-cycle order.
STATES = (DISCOVERED, ARMED, BOOTING, INSTALLING, DEPLOYED, INSTALLED, RUNNING, FAILED)
MAX_MESSAGE = 4000


@dataclass(frozen=True)
class NodeStatus:
    name: str
    state: str
    phase: str | None
    message: str | None
    updated: float | None
    facts: dict[str, Any] | None

    @property
    def boots_installer(self) -> bool:
        return self.state in (ARMED, INSTALLING)


def next_state(state: str, phase: str) -> str | None:
    """The state of a node in ``state`` once it reported ``phase``; None: the report is
    history only, the node stays as it was (an installed node renewing its DHCP lease, or
    booting from its disk). The dashboard follows nodes live with this, as a table."""
    if phase in phases.BOOT_STEPS or phase == phases.POWER_OPERATION:
        return state if state in (ARMED, BOOTING) else None
    if phase in (phases.INSTALL_FINISHED, phases.FIRST_BOOT):
        return INSTALLED
    if phase == phases.RUNNING:
        return RUNNING
    if phase == phases.STARTING:
        return BOOTING
    if phase in (phases.REBOOTING, phases.DEPLOYED):
        return DEPLOYED
    if phase == phases.FAILED:
        return FAILED
    return INSTALLING if state == ARMED else state


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class NodeStates:
    """Runtime state of nodes, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.inventory = Inventory(session)

    def _node_id(self, name: str) -> int:
        # one lookup per node and transaction: a report goes through several NodeStates
        ids: dict[str, int] = self.session.info.setdefault("corral_node_ids", {})
        if name in ids:
            return ids[name]
        node_id = self.session.scalar(select(m.Node.id).where(m.Node.name == name))
        if node_id is None:
            self.inventory.node(name)  # raises NotFound
        assert node_id is not None
        ids[name] = node_id
        return node_id

    def _row(self, name: str) -> m.NodeState:
        node_id = self._node_id(name)
        row = self.session.get(m.NodeState, node_id)
        if row is None:
            # A node never seen before is armed: its first network boot installs it.
            row = m.NodeState(node_id=node_id, state=ARMED, updated=time.time())
            self.session.add(row)
        return row

    def status(self, name: str) -> NodeStatus:
        row = self._row(name)
        return NodeStatus(name, row.state, row.phase, row.message, row.updated, row.facts)

    def statuses(self, names: list[str] | None = None) -> list[NodeStatus]:
        query = (
            select(m.Node.name, m.NodeState)
            .outerjoin(m.NodeState, m.NodeState.node_id == m.Node.id)
            .order_by(m.Node.name)
        )
        if names is not None:
            query = query.where(m.Node.name.in_(names))
            known = set(self.session.scalars(select(m.Node.name).where(m.Node.name.in_(names))))
            missing = [n for n in names if n not in known]
            if missing:
                raise NotFound("node", missing[0])
        out = []
        for name, row in self.session.execute(query):
            if row is None:
                out.append(NodeStatus(name, ARMED, None, None, None, None))
            else:
                out.append(
                    NodeStatus(name, row.state, row.phase, row.message, row.updated, row.facts)
                )
        return out

    def counts(self) -> dict[str, int]:
        """How many nodes are in each state (a node never seen is armed), in one query."""
        state = func.coalesce(m.NodeState.state, ARMED)
        query = (
            select(state, func.count())
            .select_from(m.Node)
            .outerjoin(m.NodeState, m.NodeState.node_id == m.Node.id)
            .group_by(state)
        )
        return {str(name): int(count) for name, count in self.session.execute(query)}

    def arm(self, names: list[str]) -> None:
        """Make the nodes' next network boot install them (``corral node reinstall``)."""
        for name in names:
            row = self._row(name)
            row.state, row.token_hash, row.phase, row.message = ARMED, None, None, None
            row.updated = time.time()
            self._event(name, "armed", "re-armed for install", "admin")

    def issue_token(self, name: str) -> str:
        """A fresh token for the node's install; any previous one stops working."""
        row = self._row(name)
        token = secrets.token_urlsafe(32)
        row.token_hash = _hash(token)
        row.updated = time.time()
        return token

    def netboot(self, name: str, source: str) -> str:
        """A diskless node boots: a fresh token for this boot, and the node is ``booting``."""
        token = self.issue_token(name)
        row = self._row(name)
        row.state, row.phase, row.message = BOOTING, None, "network boot (diskless)"
        self._event(name, "netboot", "fetched its diskless boot token", source)
        return token

    def revoke_token(self, name: str) -> None:
        """The node's token stops working (its install is over)."""
        self._row(name).token_hash = None

    def awaiting_first_boot(self) -> list[NodeStatus]:
        """Nodes whose agent rebooted them into their installed system, or started their
        diskless one, not heard of since."""
        query = (
            select(m.Node.name, m.NodeState)
            .join(m.NodeState, m.NodeState.node_id == m.Node.id)
            .where(
                ((m.NodeState.state == DEPLOYED) & (m.NodeState.phase == phases.REBOOTING))
                | ((m.NodeState.state == BOOTING) & (m.NodeState.phase == phases.STARTING))
            )
        )
        return [
            NodeStatus(name, row.state, row.phase, row.message, row.updated, row.facts)
            for name, row in self.session.execute(query)
        ]

    def in_progress(self) -> list[NodeStatus]:
        """Nodes on their way: armed ones that started to boot, installing, booting."""
        query = (
            select(m.Node.name, m.NodeState)
            .join(m.NodeState, m.NodeState.node_id == m.Node.id)
            .where(m.NodeState.state.in_((ARMED, INSTALLING, BOOTING)))
            .where(m.NodeState.phase.is_not(None))
        )
        return [
            NodeStatus(name, row.state, row.phase, row.message, row.updated, row.facts)
            for name, row in self.session.execute(query)
        ]

    def boot_steps(self, name: str, since: float) -> list[m.NodeEvent]:
        """The boot steps corral served the node since ``since``, oldest first."""
        query = (
            select(m.NodeEvent)
            .where(m.NodeEvent.node == name, m.NodeEvent.time >= since)
            .where(m.NodeEvent.phase.in_(phases.BOOT_STEPS))
            .order_by(m.NodeEvent.time, m.NodeEvent.id)  # a DHCP step may be stored late
        )
        return list(self.session.scalars(query))

    def check_token(self, name: str, token: str | None) -> bool:
        row = self.session.get(m.NodeState, self._node_id(name))
        expected = row.token_hash if row is not None else None
        # Compare even when there is nothing to compare with, in constant time.
        return hmac.compare_digest(expected or "!" * 64, _hash(token or "")) and bool(expected)

    def record(
        self,
        name: str,
        phase: str,
        message: str,
        source: str,
        *,
        reason: str | None = None,
        deployment: int | None = None,
        log: str | None = None,
        at: float | None = None,
    ) -> NodeStatus:
        """Store a node's report and move its state on. A failure keeps its ``reason``
        (:data:`~corral.agent.phases.REASONS`; the node's own word if not given), the phase
        it ended and the node's last ``log`` lines.

        ``at``: when it happened, for a boot step read from a log a moment after (DHCP).
        One older than the node's last change is history only: it must not move the node
        back to a phase it is already past."""
        if phase not in phases.LIFE_CYCLE:
            raise UsageError(
                f"unknown phase '{phase}'", f"use one of: {', '.join(phases.LIFE_CYCLE)}"
            )
        row = self._row(name)
        message = message[:MAX_MESSAGE]
        state = next_state(row.state, phase)
        late = at is not None and at < row.updated
        if state is None or (phase in phases.BOOT_STEPS and late):
            # an installed node booting from its disk, or a step told after a later one
            self._event(name, phase, message, source, at=at)
            return self.status(name)
        during = row.phase
        row.phase, row.message, row.updated, row.state = phase, message, at or time.time(), state
        if phase == phases.FAILED:
            self._event(
                name,
                phase,
                message,
                source,
                reason=reason or phases.NODE_ERROR,
                during=during,
                deployment=deployment,
                log=log,
            )
        else:
            self._event(name, phase, message, source, deployment=deployment, at=at)
        return self.status(name)

    def record_unknown(
        self, mac: str | None, phase: str, message: str, source: str, at: float | None = None
    ) -> None:
        """Store a boot step of a machine that is in no node's interfaces: history only
        (node ""), under its ``mac`` when corral saw it (None: only its address is known,
        in ``source``)."""
        if phase not in phases.BOOT_STEPS:
            raise UsageError(f"an unknown machine has only boot steps, not '{phase}'")
        self.session.add(
            m.NodeEvent(
                node="",
                mac=mac,
                time=at or time.time(),
                phase=phase,
                message=message[:MAX_MESSAGE],
                source=source,
            )
        )

    def _event(
        self, name: str, phase: str, message: str, source: str, at: float | None = None, **more: Any
    ) -> None:
        self.session.add(
            m.NodeEvent(
                node=name,
                time=at or time.time(),
                phase=phase,
                message=message,
                source=source,
                **more,
            )
        )

    def events(self, name: str, limit: int = 50) -> list[m.NodeEvent]:
        query = (
            select(m.NodeEvent)
            .where(m.NodeEvent.node == name)
            .order_by(m.NodeEvent.id.desc())
            .limit(limit)
        )
        return list(reversed(list(self.session.scalars(query))))

    def discover(
        self,
        mac: str,
        facts: dict[str, Any],
        source: str,
        *,
        max_nodes: int = 1000,
        per_minute: int = 60,
    ) -> str:
        """Register an unknown machine as a node in state ``discovered``; returns its name.

        The node is named after its MAC and does not netboot; adopt it with
        ``corral node set NAME --profile ... --ip ...`` and ``corral node reinstall NAME``.
        Anyone may call this (the machine has no token yet), so it never touches a node
        that is not in state ``discovered``, and at most ``max_nodes`` such nodes exist,
        at most ``per_minute`` of them new in the last minute.
        """
        try:
            mac = normalize_mac(mac)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
        owner = self.session.scalar(
            select(m.Node.name).join(m.Interface).where(m.Interface.mac == mac)
        )
        if owner is not None:
            if self.status(owner).state != DISCOVERED:
                raise AlreadyExists(
                    f"MAC {mac} belongs to node {owner}, which discovery does not change",
                    "a managed node reports through its install, with its token",
                )
            name = owner
        else:
            self._check_discovery_limits(max_nodes, per_minute)
            name = "d" + mac.replace(":", "")
            self.inventory.add(
                "node",
                [
                    NodeSpec(
                        name=name,
                        interfaces=[InterfaceSpec(name="eth0", mac=mac)],
                        netboot=False,
                    )
                ],
            )
        row = self._row(name)
        row.state = DISCOVERED
        row.facts = facts
        row.updated = time.time()
        self._event(name, "discovered", f"mac={mac}" if owner else f"new: mac={mac}", source)
        return name

    def _check_discovery_limits(self, max_nodes: int, per_minute: int) -> None:
        discovered = self.session.scalar(
            select(func.count()).select_from(m.NodeState).where(m.NodeState.state == DISCOVERED)
        )
        if (discovered or 0) >= max_nodes:
            raise LimitReached(
                f"{discovered} discovered nodes already: no more are registered",
                "adopt or remove discovered nodes, or raise discovery_max_nodes in the config",
            )
        recent = self.session.scalar(
            select(func.count())
            .select_from(m.NodeEvent)
            .where(m.NodeEvent.phase == "discovered")
            .where(m.NodeEvent.message.startswith("new: "))
            .where(m.NodeEvent.time > time.time() - 60)
        )
        if (recent or 0) >= per_minute:
            raise LimitReached(
                f"{recent} machines discovered in the last minute: try again later",
                "raise discovery_per_minute in the config if this is expected",
            )
