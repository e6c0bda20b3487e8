"""Nodes added and changed by range (corral.inventory.nodes): consecutive addresses, one
interface changed in its place, every node of a range stored together."""

from __future__ import annotations

import pytest

from corral.errors import AlreadyExists, InvalidValue
from corral.inventory.nodes import (
    NodeChanges,
    consecutive_ips,
    consecutive_macs,
    edit_nodes,
    new_nodes,
    with_interface,
)
from corral.inventory.store import Inventory


def test_consecutive_addresses_count_up_from_the_first() -> None:
    assert consecutive_macs("52-54-00-00-00-FE", 3) == [
        "52:54:00:00:00:fe",
        "52:54:00:00:00:ff",
        "52:54:00:00:01:00",
    ]
    assert consecutive_ips("10.0.0.254", 3) == ["10.0.0.254", "10.0.0.255", "10.0.1.0"]
    with pytest.raises(InvalidValue, match="runs past ff:ff:ff:ff:ff:ff"):
        consecutive_macs("ff:ff:ff:ff:ff:fe", 3)
    with pytest.raises(InvalidValue, match="invalid MAC address '52:54'"):
        consecutive_macs("52:54", 1)
    with pytest.raises(InvalidValue, match=r"invalid IPv4 address '10\.0\.0'"):
        consecutive_ips("10.0.0", 1)


def test_an_interface_changes_in_its_place_or_comes_last() -> None:
    interfaces = [{"name": "eth0", "ip": "10.0.0.1"}, {"name": "eth1"}, {"name": "bond0"}]
    changed = with_interface(interfaces, "eth1", {"mac": "52:54:00:00:00:01"})
    assert changed == [
        {"name": "eth0", "ip": "10.0.0.1"},
        {"name": "eth1", "mac": "52:54:00:00:00:01"},
        {"name": "bond0"},
    ]
    assert interfaces[1] == {"name": "eth1"}  # the given list is left alone
    assert with_interface(interfaces, "ib0", {"ip": "10.1.0.1"})[-1] == {
        "name": "ib0",
        "ip": "10.1.0.1",
    }


def test_a_range_needs_one_address_per_node() -> None:
    with pytest.raises(InvalidValue, match="2 MACs for 3 nodes: give one per node"):
        NodeChanges(names=["n1", "n2", "n3"], macs=["52:54:00:00:00:01", None])


def test_new_nodes_and_edits_over_a_range(inv: Inventory) -> None:
    names = ["n1", "n2"]
    inv.add(
        "node",
        new_nodes(
            NodeChanges(
                names,
                macs=consecutive_macs("52:54:00:00:00:01", 2),
                ips=consecutive_ips("10.0.0.11", 2),
                address={"gateway": "10.0.0.1"},
                fields={"netboot": False},
                variables={"row": "r1"},
            )
        ),
    )
    n2 = inv.node("n2")
    assert (n2.interfaces[0].mac, n2.interfaces[0].ip) == ("52:54:00:00:00:02", "10.0.0.12")
    assert (n2.interfaces[0].gateway, n2.netboot) == ("10.0.0.1", False)
    assert n2.variables == {"row": "r1"}
    # the nodes of a range are checked together: one MAC for two is refused
    same = NodeChanges(names, macs=["52:54:00:00:00:09", "52:54:00:00:00:09"])
    with pytest.raises(AlreadyExists, match="given to both n1 and n2"):
        edit_nodes(inv, same)
    eth1 = NodeChanges(names, interface="eth1", ips=[None, "10.0.1.12"], variables={"slot": 2})
    assert edit_nodes(inv, eth1) == ["changed", "changed"]
    n1, n2 = inv.node("n1"), inv.node("n2")
    assert [i.name for i in n1.interfaces] == ["eth0"]  # nothing given for n1's eth1
    assert [(i.name, i.ip) for i in n2.interfaces] == [("eth0", "10.0.0.12"), ("eth1", "10.0.1.12")]
    assert n1.variables == {"row": "r1", "slot": 2}
    assert edit_nodes(inv, eth1) == ["unchanged", "unchanged"]
