from __future__ import annotations

import pytest

from corral.errors import AlreadyExists, InvalidValue, NotFound, UsageError
from corral.inventory.schema import DistroSpec, GroupSpec, NodeSpec, ProfileSpec
from corral.inventory.store import Inventory


def _node(name: str, mac: str | None = None, ip: str | None = None) -> NodeSpec:
    return NodeSpec(name=name, interfaces=[{"mac": mac, "ip": ip}])  # type: ignore[list-item]


def test_add_get_update_remove(inv: Inventory) -> None:
    inv.add("node", [_node("n1", "52:54:00:00:00:01", "10.0.0.1")])
    assert inv.node("n1").interfaces[0].ip == "10.0.0.1"
    assert inv.update("node", ["n1"], {"netboot": False}) == 1
    assert inv.update("node", ["n1"], {"netboot": False}) == 0
    assert inv.remove("node", ["n1"]) == 1
    with pytest.raises(NotFound, match="unknown node 'n1'"):
        inv.node("n1")


def test_generation_grows_only_on_change(inv: Inventory) -> None:
    inv.add("node", [_node("n1")])
    gen = inv.generation
    inv.put("node", [_node("n1")])
    assert inv.generation == gen


def test_duplicate_mac_and_ip_are_refused(inv: Inventory) -> None:
    inv.add("node", [_node("n1", "52:54:00:00:00:01", "10.0.0.1")])
    with pytest.raises(AlreadyExists, match=r"MAC 52:54:00:00:00:01 of node n2 belongs to node n1"):
        inv.add("node", [_node("n2", "52:54:00:00:00:01")])
    with pytest.raises(AlreadyExists, match=r"IP 10\.0\.0\.1 of node n2 belongs to node n1"):
        inv.add("node", [_node("n2", ip="10.0.0.1")])
    with pytest.raises(AlreadyExists, match="given to both n2 and n3"):
        inv.add("node", [_node("n2", ip="10.0.0.2"), _node("n3", ip="10.0.0.2")])


def test_existing_name_is_refused(inv: Inventory) -> None:
    inv.add("node", [_node("n1")])
    with pytest.raises(AlreadyExists, match="node 'n1' exists already"):
        inv.add("node", [_node("n1")])


def test_unknown_references_are_refused(inv: Inventory) -> None:
    with pytest.raises(NotFound, match="unknown profile 'nope'"):
        inv.add("node", [NodeSpec(name="n1", profiles=["~nope"])])
    with pytest.raises(NotFound, match="unknown distro 'd'"):
        inv.add("profile", [ProfileSpec(name="p", distro="d")])


def test_in_use_entities_cannot_be_removed(inv: Inventory) -> None:
    inv.add(
        "distro", [DistroSpec(name="d", family="debian", os_version="12", kernel="k", initrd="i")]
    )  # type: ignore[arg-type]
    inv.add("profile", [ProfileSpec(name="p", distro="d")])
    inv.add("node", [NodeSpec(name="n1", profiles=["p"])])
    with pytest.raises(UsageError, match="profile 'p' refers to it"):
        inv.remove("distro", ["d"])
    with pytest.raises(UsageError, match="node 'n1' refers to it"):
        inv.remove("profile", ["p"])


def test_interface_names_must_be_unique(inv: Inventory) -> None:
    with pytest.raises(InvalidValue, match="interface names must be unique"):
        inv.add("node", [NodeSpec(name="n1", interfaces=[{"name": "eth0"}, {"name": "eth0"}])])  # type: ignore[list-item]


def test_update_refuses_a_rename_with_a_clear_message(inv: Inventory) -> None:
    """Issue 12: a REST PATCH with a new name used to fail with a MAC conflict with itself."""
    inv.add("node", [_node("n1", "52:54:00:00:00:01", "10.0.0.1")])
    with pytest.raises(InvalidValue, match="node 'n1' cannot be renamed to 'n2'") as info:
        inv.update("node", ["n1"], {"name": "n2"})
    assert "belongs to" not in str(info.value)
    assert inv.update("node", ["n1"], {"name": "n1", "netboot": False}) == 1
    assert inv.names("node") == ["n1"]


def test_edit_merges_variables_and_refuses_variables_that_are_no_mapping(inv: Inventory) -> None:
    inv.add("node", [NodeSpec(name="n1", variables={"row": "r1", "slot": 1})])
    assert inv.edit("node", ["n1"], {"variables": {"slot": 2}, "netboot": False}) == 1
    assert inv.node("n1").variables == {"row": "r1", "slot": 2}
    assert inv.edit("node", ["n1"], {"variables": {}}) == 0
    for bad in ("row=r2", ["row"]):
        # a TypeError before (a REST PATCH answered 500)
        with pytest.raises(InvalidValue, match="node n1: variables: Input should be a valid"):
            inv.edit("node", ["n1"], {"variables": bad})
    assert inv.node("n1").variables == {"row": "r1", "slot": 2}


def test_a_rack_variable_must_name_a_group(inv: Inventory) -> None:
    with pytest.raises(InvalidValue, match="node 'n1': rack 'r2' names no rack") as refused:
        inv.add("node", [NodeSpec(name="n1", variables={"rack": "r2"})])
    assert "corral group add r2" in (refused.value.hint or "")
    assert inv.names("node") == []
    # a group may name itself: the rack's group carries the variable for its nodes
    inv.add("group", [GroupSpec(name="r2", variables={"rack": "r2"})])
    inv.add(
        "node", [NodeSpec(name="n1", groups=["r2"]), NodeSpec(name="n2", variables={"rack": "r2"})]
    )
    with pytest.raises(InvalidValue, match="names no rack"):
        inv.edit("node", ["n2"], {"variables": {"rack": "r3"}})
    assert inv.node("n2").variables == {"rack": "r2"}
