"""Power from the inventory to real BMC emulators, as an administrator drives it: a
cluster file with Redfish and IPMI nodes (their passwords sealed), `corral node power`,
the REST API's POST /api/v1/power, the nodes' history, and no password anywhere it
could be read."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.inventory import db
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.bmc_rigs import (
    IPMI_SIM,
    IPMITOOL,
    PASSWORD,
    USER,
    IpmiRig,
    RedfishRig,
    ipmi_bmc,
    redfish_bmcs,
)
from tests.conftest import corral

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("sushy_tools") is None or not (IPMI_SIM and IPMITOOL),
        reason="needs sushy-tools, ipmi_sim and ipmitool (make setup)",
    ),
]


@dataclass
class Rigs:
    redfish: RedfishRig
    ipmi: IpmiRig


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[Rigs]:
    with (
        redfish_bmcs(tmp_path / "redfish", 3) as redfish,
        ipmi_bmc(tmp_path / "ipmi", "n4") as ipmi,
    ):
        yield Rigs(redfish, ipmi)


def cluster_file(rigs: Rigs) -> str:
    """n1-n3 on Redfish (driver, URL, user and password from their group), n4 on IPMI,
    n5 on Redfish with a wrong password."""
    systems = rigs.redfish.systems
    return f"""
groups:
  - name: rack1
    power: {{driver: redfish, address: '{rigs.redfish.url}', user: {USER}, password: {PASSWORD}}}
nodes:
  - {{name: n1, groups: [rack1], power: {{system: '{systems[0]}'}}}}
  - {{name: n2, groups: [rack1], power: {{system: '{systems[1]}'}}}}
  - {{name: n3, groups: [rack1], power: {{system: '{systems[2]}'}}}}
  - name: n4
    power: {{driver: ipmi, address: '{rigs.ipmi.address}', user: {USER},
             password: {PASSWORD}, cipher_suite: 3}}
  - {{name: n5, groups: [rack1], power: {{system: '{systems[0]}', password: wrong-one}}}}
"""


def test_node_power_through_the_inventory_with_each_failure_named(rigs: Rigs, home: Path) -> None:
    applied = corral("apply", "-f", "-", home=home, stdin=cluster_file(rigs))
    assert applied.returncode == 0, applied.stderr

    on = corral("node", "power", "on", "n[1-5]", home=home)
    assert on.returncode == 1, on.stdout + on.stderr
    rows = {line.split()[0]: line for line in on.stdout.splitlines() if line.startswith("n")}
    for node in ("n1", "n2", "n3", "n4"):
        assert " ok " in rows[node], on.stdout
    assert "FAILED (auth)" in rows["n5"] and "refused" in rows["n5"], on.stdout
    assert "1 of 5 failed: n5" in on.stdout
    assert rigs.ipmi.running_pid() is not None  # ipmi_sim really powered n4 on

    deadline = time.monotonic() + 10
    while True:  # a BMC applies a change a moment after it acknowledged it
        status = corral("node", "power", "status", "n[1-4]", home=home)
        states = [line.split()[3] for line in status.stdout.splitlines()[1:] if line.strip()]
        if states == ["on"] * 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status.returncode == 0 and states == ["on"] * 4, status.stdout

    history = corral("node", "history", "n[4-5]", home=home)
    assert "power on through ipmi 127.0.0.1" in history.stdout, history.stdout
    assert "power on through redfish" in history.stdout and "failed" in history.stdout

    # no password in what corral prints or stores in the clear
    for shown in (
        corral("export", home=home).stdout,
        corral("node", "show", "n4", home=home).stdout,
        corral("group", "show", "rack1", home=home).stdout,
        on.stdout + on.stderr,
        history.stdout,
    ):
        assert PASSWORD not in shown and "wrong-one" not in shown
    assert "password: (stored)" in corral("node", "show", "n4", home=home).stdout
    assert PASSWORD.encode() not in (home / "corral.db").read_bytes()


def test_power_over_the_rest_api(rigs: Rigs, home: Path) -> None:
    assert corral("apply", "-f", "-", home=home, stdin=cluster_file(rigs)).returncode == 0
    service = BootService(db.settings(), db.engine())
    with TestClient(create_app(service, "admin-secret")) as client:
        client.headers["Authorization"] = "Bearer admin-secret"
        answer = client.post("/api/v1/power", json={"nodes": "n[4-5]", "action": "cycle"})
        assert answer.status_code == 200, answer.text
        n4, n5 = answer.json()
        assert (n4["node"], n4["ok"], n4["driver"]) == ("n4", True, "ipmi")
        assert (n5["ok"], n5["why"]) == (False, "auth")
        assert PASSWORD not in answer.text
        unknown = client.post("/api/v1/power", json={"nodes": "n9", "action": "on"})
        assert unknown.status_code == 404
        bad = client.post("/api/v1/power", json={"nodes": "n1", "action": "reboot"})
        assert bad.status_code == 422
        shown = client.get("/api/v1/nodes/n4").json()
        assert shown["power"]["password"] == "(stored)"
        assert "/api/v1/power" in client.get("/openapi.json").json()["paths"]
    db.close()
