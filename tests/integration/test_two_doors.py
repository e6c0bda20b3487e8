"""The CLI and the REST API are two doors onto the same domain functions: the same edits
through each leave the same inventory (they did not: a PATCH of `variables` replaced them
where `corral ... set --var` merged).

The REST API has no range of nodes and no one-interface change of its own: its side of
those edits spells each node and interface list out, which is what the CLI's rules
(corral.inventory.nodes) must make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.inventory import db
from corral.inventory.clusterfile import apply_cluster, load_cluster
from corral.serve.boot import BootService
from corral.serve.http import create_app

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

DATA = Path(__file__).parents[1] / "data" / "cluster.yaml"

C01_ETH0 = {"name": "eth0", "mac": "52:54:00:00:00:01", "ip": "10.0.0.11", "gateway": "10.0.0.1"}
BONDED = [
    {"name": "eth0", "mac": "52:54:00:00:00:02"},
    {"name": "eth1", "mac": "52:54:00:00:00:13"},  # changed in its place, before bond0
    {
        "name": "bond0",
        "bond_members": ["eth0", "eth1"],
        "ip": "10.0.0.12",
        "netmask": "24",
        "vlan": 42,
    },
]
#: r01, r02, r03 as `node add 'r[01-03]'` makes them: consecutive MACs (the carry into the
#: fifth byte) and IPs from the first node's
ROWS = {"groups": ["compute"], "variables": {"row": "r9"}}
R_MACS = {"r01": "52:54:00:00:20:fe", "r02": "52:54:00:00:20:ff", "r03": "52:54:00:00:21:00"}


def _iface(mac: str, ip: str, **more: str) -> list[dict[str, str]]:
    return [{"name": "eth0", "mac": mac, "ip": ip, **more}]


#: (CLI arguments, the REST requests of the same edit: method, path, body)
EDITS: list[tuple[list[str], list[tuple[str, str, dict[str, Any]]]]] = [
    (["node", "set", "c01", "--var", "row=r7", "--var", "slot=3"],
     [("PATCH", "/api/v1/nodes/c01", {"variables": {"row": "r7", "slot": 3}})]),
    (["group", "set", "compute", "--var", "site=hall-b"],
     [("PATCH", "/api/v1/groups/compute", {"variables": {"site": "hall-b"}})]),
    (["profile", "set", "compute", "--var", "role=gpu", "--kernel-arg", "nomodeset"],
     [("PATCH", "/api/v1/profiles/compute",
       {"variables": {"role": "gpu"}, "kernel_args": ["nomodeset"]})]),
    # node set --interface: a new interface goes last, a known one changes in its place
    (["node", "set", "c01", "--interface", "eth1", "--ip", "10.0.1.11", "--netmask", "16"],
     [("PATCH", "/api/v1/nodes/c01",
       {"interfaces": [C01_ETH0, {"name": "eth1", "ip": "10.0.1.11", "netmask": "16"}]})]),
    (["node", "set", "bonded", "--interface", "eth1", "--mac", "52:54:00:00:00:13"],
     [("PATCH", "/api/v1/nodes/bonded", {"interfaces": BONDED})]),
    # node add and node set over a range: the first MAC and IP count up node by node
    (["node", "add", "r[01-03]", "--mac", "52:54:00:00:20:fe", "--ip", "10.0.2.10",
      "--group", "compute", "--var", "row=r9"],
     [("POST", "/api/v1/nodes", {"name": name, **ROWS, "interfaces": _iface(mac, f"10.0.2.1{i}")})
      for i, (name, mac) in enumerate(R_MACS.items())]),
    (["node", "set", "r[02-03]", "--ip", "10.0.2.20", "--gateway", "10.0.2.1"],
     [("PATCH", f"/api/v1/nodes/{name}",
       {"interfaces": _iface(R_MACS[name], f"10.0.2.2{i}", gateway="10.0.2.1")})
      for i, name in enumerate(["r02", "r03"])]),
    (["group", "set", "compute", "--profile", "base"],
     [("PATCH", "/api/v1/groups/compute", {"profiles": ["base"]})]),
]  # fmt: skip


def inventory_of(home: Path) -> dict[str, Any]:
    os.environ["CORRAL_HOME"] = str(home)
    db.close()
    with db.inventory() as inv:
        return {
            kind: [s.model_dump(mode="json") for s in inv.specs(kind)]
            for kind in ("distro", "profile", "group", "node")
        }


def fresh(home: Path) -> None:
    os.environ["CORRAL_HOME"] = str(home)
    db.close()
    with db.inventory() as inv:
        apply_cluster(inv, load_cluster(DATA.read_text(), "fixture"))


def test_the_same_edits_through_the_cli_and_rest_give_the_same_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "cli"))
    cli, rest = tmp_path / "cli", tmp_path / "rest"
    fresh(cli)
    for argv, _ in EDITS:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *argv],
            env=dict(os.environ, CORRAL_HOME=str(cli)),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{argv}: {result.stderr}"
    fresh(rest)  # this process's settings and engine: the REST door's home
    service = BootService(db.settings(), db.engine())
    with TestClient(create_app(service, "admin")) as client:
        for _, requests in EDITS:
            for method, path, body in requests:
                answer = client.request(
                    method, path, json=body, headers={"Authorization": "Bearer admin"}
                )
                assert answer.is_success, f"{method} {path}: {answer.text}"
    by_cli, by_rest = inventory_of(cli), inventory_of(rest)
    assert json.dumps(by_cli, sort_keys=True) == json.dumps(by_rest, sort_keys=True)
    c01 = next(n for n in by_rest["node"] if n["name"] == "c01")
    assert c01["variables"] == {"rack": "r1", "row": "r7", "slot": 3}  # merged, not replaced
    group = next(g for g in by_rest["group"] if g["name"] == "compute")
    assert group["variables"] == {"role": "worker", "site": "hall-b"}
    profile = next(p for p in by_rest["profile"] if p["name"] == "compute")
    assert profile["variables"] == {"site": "hall-a", "role": "gpu"}
    nodes = {n["name"]: n for n in by_cli["node"]}
    assert [(i["name"], i["ip"]) for i in nodes["c01"]["interfaces"]] == [
        ("eth0", "10.0.0.11"),
        ("eth1", "10.0.1.11"),
    ]
    assert [i["name"] for i in nodes["bonded"]["interfaces"]] == ["eth0", "eth1", "bond0"]
    addresses = [(i["mac"], i["ip"]) for r in ("r01", "r02", "r03") for i in nodes[r]["interfaces"]]
    assert addresses == [
        ("52:54:00:00:20:fe", "10.0.2.10"),
        ("52:54:00:00:20:ff", "10.0.2.20"),
        ("52:54:00:00:21:00", "10.0.2.21"),
    ]
