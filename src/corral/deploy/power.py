"""Powering inventory nodes: their merged power settings made into BMCs (the password
opened with the home's key), the operation run on all of them at once
(:func:`corral.power.power`), and each operation stored as an event in the node's history.

``corral node power``, the REST API, deployments and diskless boots all go through here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.orm import Session

from corral.agent import phases
from corral.config import Settings
from corral.inventory.merge import merge_node
from corral.inventory.state import NodeStates
from corral.inventory.store import Inventory
from corral.power import Bmc, Outcome, PowerContext, power
from corral.vault import Vault

log = logging.getLogger(__name__)

#: What a node with no power settings gets: corral tells whom to power on.
NO_DRIVER = "manual"


def node_bmcs(session: Session, names: Iterable[str], vault: Vault) -> list[Bmc]:
    """The BMC of each node, from its merged power settings. A node with none, but a
    ``power_command`` variable (corral before power drivers), gets the command driver;
    one with neither, the manual driver."""
    inv = Inventory(session, vault)
    groups = {g.name: g for g in inv.specs("group")}
    profiles = {p.name: p for p in inv.specs("profile")}
    bmcs = []
    for node in inv.specs("node", list(names)):
        merged = merge_node(node, groups, profiles)
        fields: dict[str, Any] = dict(merged.values.get("power") or {})
        legacy = merged.values["variables"].get("power_command")
        if not fields.get("driver"):
            fields = {"driver": "command", "command": str(legacy)} if legacy else {}
        sealed = fields.pop("password", None)
        bmcs.append(
            Bmc(
                node=node.name,
                driver=str(fields.pop("driver", NO_DRIVER)),
                password=vault.open(sealed, f"the BMC password of node {node.name}")
                if sealed
                else None,
                **fields,
            )
        )
    return bmcs


def describe(outcome: Outcome, bmc: Bmc) -> str:
    """One line for the node's history: "cycle through ipmi 10.1.0.11: on (1.2 s)"."""
    if not outcome.ok:  # the reason names the BMC
        return f"power {outcome.action} through {bmc.driver} failed: {outcome.reason}"
    through = f"{bmc.driver} {bmc.address}" if bmc.address else bmc.driver
    state = f": {outcome.state}" if outcome.state else ""
    note = f" ({outcome.reason})" if outcome.reason else ""
    return f"power {outcome.action} through {through}{state}{note}"


def power_nodes(
    settings: Settings,
    session: Callable[[], AbstractContextManager[Session]],
    names: Iterable[str],
    action: str,
    *,
    netboot: bool = False,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``action`` on the nodes (``settings.power_pool`` at once, each within
    ``settings.power_timeout``), and store on, off and cycle as ``power`` events in their
    history (a status only reads). Each node's failure is its outcome; none raises."""
    vault = Vault(settings.home)
    with session() as s:
        bmcs = node_bmcs(s, names, vault)
    outcomes = power(
        bmcs,
        action,
        netboot=netboot,
        pool=settings.power_pool,
        timeout=settings.power_timeout,
        context=PowerContext(home=settings.home),
        on_done=on_done,
    )
    if action != "status":
        with session() as s:
            states = NodeStates(s)
            for outcome, bmc in zip(outcomes, bmcs, strict=True):
                told = describe(outcome, bmc)
                states.record(outcome.node, phases.POWER_OPERATION, told, "corral")
    for outcome in outcomes:  # the caller shows them: logged for corral serve's log
        if not outcome.ok:
            log.info("node %s: power %s failed: %s", outcome.node, action, outcome.reason)
    return outcomes
