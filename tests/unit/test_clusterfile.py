from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from corral.errors import InvalidClusterFile, NodeRangeError
from corral.inventory.clusterfile import apply_cluster, export_cluster, load_cluster
from corral.inventory.store import Inventory

EXAMPLE = Path(__file__).parents[2] / "examples" / "cluster.yaml"


def test_range_entry_gives_consecutive_addresses() -> None:
    cluster = load_cluster(
        "nodes:\n  - name: n[08-11]\n"
        # A /16: 10.0.0.255 and 10.0.1.0 are host addresses there (not in a /24).
        "    interfaces: [{mac: '52:54:00:00:00:fe', ip: 10.0.0.254, netmask: '16'}]\n",
        "t",
    )
    assert [n.name for n in cluster.nodes] == ["n08", "n09", "n10", "n11"]
    assert [n.interfaces[0].ip for n in cluster.nodes] == [
        "10.0.0.254",
        "10.0.0.255",
        "10.0.1.0",
        "10.0.1.1",
    ]
    assert cluster.nodes[2].interfaces[0].mac == "52:54:00:00:01:00"


def test_example_applies_idempotently_and_export_round_trips(inv: Inventory) -> None:
    cluster = load_cluster(EXAMPLE.read_text(), "example")
    first = apply_cluster(inv, cluster)
    assert first["node"] == {"created": 100, "changed": 0, "unchanged": 0}
    assert first["profile"]["created"] == 3
    again = apply_cluster(inv, cluster)
    assert all(c["created"] == c["changed"] == 0 for c in again.values())

    exported = export_cluster(inv)
    back = apply_cluster(inv, load_cluster(exported, "export"))
    assert all(c["created"] == c["changed"] == 0 for c in back.values())
    assert back["node"]["unchanged"] == 100
    assert export_cluster(inv) == exported


def test_changed_entries_are_counted(inv: Inventory) -> None:
    apply_cluster(inv, load_cluster(EXAMPLE.read_text(), "example"))
    text = EXAMPLE.read_text().replace("timezone: Europe/Paris", "timezone: UTC")
    result = apply_cluster(inv, load_cluster(text, "example"))
    assert result["profile"] == {"created": 0, "changed": 1, "unchanged": 2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: [name: n1\n", "malformed YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("nodes: {name: n1}\n", "'nodes' must be a list"),
        ("nodes:\n  - name: n1\n    colour: red\n", "nodes.0.colour: unknown field"),
        ("widgets: []\n", "widgets: unknown field"),
    ],
)
def test_bad_files_get_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster(text, "c.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_huge_range_entry_is_refused() -> None:
    with pytest.raises(NodeRangeError, match="100000"):
        load_cluster("nodes:\n  - name: n[1-200000]\n", "c.yaml")


def _nodes(inv: Inventory, text: str) -> None:
    apply_cluster(inv, load_cluster(text, "t"))


def test_export_writes_runs_of_similar_nodes_as_noderanges(inv: Inventory) -> None:
    _nodes(
        inv,
        "nodes:\n"
        "  - name: n[001-110]\n"
        "    interfaces: [{mac: '52:54:00:00:10:01', ip: 10.0.1.11, netmask: '16'}]\n"
        "  - {name: n111, interfaces: [{mac: '52:54:00:00:10:6f', ip: 10.0.1.121}]}\n"
        "  - {name: head, netboot: false}\n",
    )
    inv.update("node", ["n050"], {"variables": {"row": "r9"}})
    exported = export_cluster(inv)
    nodes = yaml.safe_load(exported)["nodes"]
    assert [n["name"] for n in nodes] == ["head", "n[001-049]", "n050", "n[051-110]", "n111"]
    assert nodes[3]["interfaces"] == [
        {"mac": "52:54:00:00:10:33", "ip": "10.0.1.61", "netmask": "255.255.0.0"}
    ]
    assert len(exported.splitlines()) < 30
    before = inv.specs("node")
    back = apply_cluster(inv, load_cluster(exported, "export"))
    assert back["node"] == {"created": 0, "changed": 0, "unchanged": 112}
    assert inv.specs("node") == before


@pytest.mark.parametrize(
    ("names", "ranges"),
    [
        (["n8", "n9", "n10", "n11"], ["n[8-11]"]),  # unpadded: the width grows
        (["n098", "n099", "n100"], ["n[098-100]"]),
        (["n09", "n10", "n011"], ["n011", "n[09-10]"]),  # n011 is not what n[09-11] gives
        (["a1", "b2", "b3"], ["a1", "b[2-3]"]),
    ],
)
def test_export_folds_only_what_expand_gives_back(
    inv: Inventory, names: list[str], ranges: list[str]
) -> None:
    _nodes(inv, "nodes:\n" + "".join(f"  - {{name: {n}}}\n" for n in names))
    exported = export_cluster(inv)
    assert [n["name"] for n in yaml.safe_load(exported)["nodes"]] == ranges
    back = sorted(load_cluster(exported, "export").nodes, key=lambda n: n.name)
    assert back == inv.specs("node")
