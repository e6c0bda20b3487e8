"""Adding and changing a range of nodes at once, as ``corral node add|set`` do, for every
door: the fields given go to each node, and one interface's to that interface of each,
its MAC and IP counting up from the first node's (:func:`consecutive_macs`,
:func:`consecutive_ips`) or given one per node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.errors import InvalidValue
from corral.inventory.schema import NodeSpec, normalize_mac, parse
from corral.inventory.store import Inventory, Outcome


def offset_ip(ip: str, offset: int) -> str:
    """The IPv4 address ``offset`` after ``ip``; ValueError for no IPv4 address."""
    return str(ipaddress.IPv4Address(ip) + offset)


def offset_mac(mac: str, offset: int) -> str:
    """The MAC address ``offset`` after ``mac``; ValueError for no MAC, or past the last."""
    value = int(normalize_mac(mac).replace(":", ""), 16) + offset
    if value >= 1 << 48:
        raise ValueError(f"MAC range starting at {mac} runs past ff:ff:ff:ff:ff:ff")
    digits = f"{value:012x}"
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def consecutive_macs(first: str, count: int) -> list[str]:
    """``count`` consecutive MAC addresses from ``first``, one per node of a range."""
    try:
        return [offset_mac(first, i) for i in range(count)]
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None


def consecutive_ips(first: str, count: int) -> list[str]:
    """``count`` consecutive IPv4 addresses from ``first``, one per node of a range."""
    try:
        return [offset_ip(first, i) for i in range(count)]
    except ValueError:
        raise InvalidValue(f"invalid IPv4 address '{first}'") from None


@dataclass(frozen=True)
class NodeChanges:
    """What to give each node of a range."""

    names: Sequence[str]
    #: The interface that ``macs``, ``ips`` and ``address`` apply to.
    interface: str = "eth0"
    #: One MAC per node (None: that node's is left alone), or none at all.
    macs: Sequence[str | None] = ()
    ips: Sequence[str | None] = ()
    #: The interface's other fields given: netmask, gateway, vlan, bond_members.
    address: Mapping[str, Any] = field(default_factory=dict)
    #: The node's fields given (profiles, groups, install_method, netboot): each replaces.
    fields: Mapping[str, Any] = field(default_factory=dict)
    #: Variables merged by key into each node's own.
    variables: Mapping[str, Any] = field(default_factory=dict)
    #: Power fields per node (its BMC address differs), merged into each node's own; or none.
    power: Sequence[Mapping[str, Any]] = ()

    def __post_init__(self) -> None:
        for what, given in (("MACs", self.macs), ("IPs", self.ips), ("power", self.power)):
            if given and len(given) != len(self.names):
                raise InvalidValue(
                    f"{len(given)} {what} for {len(self.names)} nodes: give one per node"
                )

    def interface_changes(self, index: int) -> dict[str, Any]:
        """The fields the interface of node number ``index`` gets."""
        changes = dict(self.address)
        for key, given in (("mac", self.macs), ("ip", self.ips)):
            if given and given[index] is not None:
                changes[key] = given[index]
        return changes


def with_interface(
    interfaces: Sequence[Mapping[str, Any]], name: str, changes: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """``interfaces`` with the one called ``name`` changed in its place, or added last."""
    result = [dict(i) for i in interfaces]
    for iface in result:
        if iface["name"] == name:
            iface.update(changes)
            return result
    return [*result, {"name": name, **changes}]


def new_nodes(changes: NodeChanges) -> list[NodeSpec]:
    """The nodes of ``changes.names``, each with the one interface and fields given;
    checked, not stored (:meth:`Inventory.add` them)."""
    specs = []
    for index, name in enumerate(changes.names):
        iface = {"name": changes.interface, **changes.interface_changes(index)}
        data = {"name": name, "interfaces": [iface], **changes.fields}
        if changes.variables:
            data["variables"] = dict(changes.variables)
        if changes.power:
            data["power"] = dict(changes.power[index])
        specs.append(parse(NodeSpec, data, f"node {name}"))
    return specs


def edit_nodes(inv: Inventory, changes: NodeChanges) -> list[Outcome]:
    """Change the existing nodes of ``changes.names``, checked and stored together (one
    address given to two of them is refused); what happened to each."""
    specs = []
    currents = inv.specs("node", changes.names)
    for index, current in enumerate(currents):
        edit: dict[str, Any] = {**changes.fields, "variables": dict(changes.variables)}
        if changes.power:
            edit["power"] = dict(changes.power[index])
        iface = changes.interface_changes(index)
        if iface:
            interfaces = [i.model_dump(mode="json") for i in current.interfaces]
            edit["interfaces"] = with_interface(interfaces, changes.interface, iface)
        specs.append(inv.edited("node", current, edit))
    return inv.put("node", specs)
