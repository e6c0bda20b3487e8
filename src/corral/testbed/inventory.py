"""The testbed's nodes in corral's inventory: registered by ``up`` (group ``testbed``,
install method image, the loop device as their disk, the testbed's power driver), kept
or forgotten by ``down``.

In a testbed with racks, each node also has the variable ``rack`` (``r1``, ``r2``, ...)
and is in the group of that name, which ``up`` creates: a rack is a group, so that
``corral deploy r2`` reaches a rack, and a ``rack`` variable naming no group names no rack.
Groups named ``rN`` on a testbed node are the testbed's: ``up`` replaces them.

The inventory's modules are imported where they are used, so that the testbed's own
modules load without the database.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from corral.inventory.schema import RACK
from corral.testbed.plan import TestbedState

if TYPE_CHECKING:
    from sqlalchemy import Engine

GROUP = "testbed"

_NODE = re.compile(r"^tb(\d{3})$")
_RACK = re.compile(r"^r\d+$")


def register_nodes(engine: Engine, state: TestbedState) -> dict[str, int]:
    """Add or update the nodes in the inventory (idempotent; keeps what an admin set,
    such as profiles, other interfaces and variables); returns counts by outcome."""
    from corral.inventory.clusterfile import apply_cluster
    from corral.inventory.db import transaction
    from corral.inventory.schema import ClusterSpec, GroupSpec, NodeSpec
    from corral.inventory.store import Inventory

    with transaction(engine) as session:
        inv = Inventory(session)
        existing = set(inv.names("node"))
        old = {
            s.name: s
            for s in inv.specs("node", [n.name for n in state.nodes if n.name in existing])
        }
        specs = []
        for node in state.nodes:
            data: dict[str, Any] = old[node.name].model_dump() if node.name in old else {}
            eth0 = {"name": "eth0", "mac": node.mac, "ip": node.ip, "netmask": state.netmask}
            others = [i for i in data.get("interfaces", []) if i["name"] != "eth0"]
            groups = [g for g in data.get("groups", []) if g != GROUP and not _RACK.match(g)]
            groups += [GROUP, node.rack] if node.rack else [GROUP]
            variables = dict(data.get("variables", {}))
            variables["disk"] = node.loop
            # A rack left by an earlier testbed would mislead rack-aware transports.
            variables.pop(RACK, None)
            if node.rack:
                variables[RACK] = node.rack
            variables.pop("power_command", None)  # how corral powered them before drivers
            data.update(
                name=node.name,
                interfaces=[eth0, *others],
                groups=groups,
                variables=variables,
                install_method="image",
                power={"driver": "testbed"},
            )
            specs.append(NodeSpec.model_validate(data))
        groups = [
            inv.get("group", name) if inv.exists("group", name) else GroupSpec(name=name)
            for name in [GROUP, *(r.name for r in state.racks)]
        ]
        summary = apply_cluster(inv, ClusterSpec(groups=groups, nodes=specs))
    return {str(k): v for k, v in summary["node"].items()}


def release_nodes(engine: Engine, *, forget: bool) -> tuple[list[str], list[str]]:
    """(nodes removed, nodes kept) of the testbed's group in the inventory: all of them
    removed if ``forget`` (and the group, when no other node is in it, and the rack groups
    no node is left in that are as ``up`` made them: bare), else all kept."""
    from corral.inventory.db import transaction
    from corral.inventory.schema import GroupSpec
    from corral.inventory.store import Inventory

    with transaction(engine) as session:
        inv = Inventory(session)
        names = [s.name for s in inv.specs("node") if GROUP in s.groups and _NODE.match(s.name)]
        if not forget:
            return [], names
        if names:
            inv.remove("node", names)
        used = {g for s in inv.specs("node") for g in s.groups}
        unused = [
            g.name
            for g in inv.specs("group")
            if g.name not in used
            and (g.name == GROUP or (_RACK.match(g.name) and g == GroupSpec(name=g.name)))
        ]
        if unused:
            inv.remove("group", unused)
        return names, []
