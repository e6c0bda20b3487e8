"""Item 2 of issue 12: discovery is open to anyone, so it never changes a managed node,
refuses malformed input with 422, and adds at most so many nodes (in all, and a minute)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.http import create_app

ADMIN = {"Authorization": "Bearer admin-secret"}


def client(settings: Settings) -> TestClient:
    app = create_app(BootService(settings, db.engine()), "admin-secret")
    return TestClient(app, client=("10.0.0.99", 40000))


@pytest.fixture
def stranger(fixture_cluster: None, settings: Settings) -> Iterator[TestClient]:
    with client(settings) as c:
        yield c


def facts(mac: str, **more: object) -> dict[str, object]:
    return {"mac": mac, "cpus": 2, "memory_mb": 1024, **more}


def test_a_managed_nodes_mac_does_not_change_it(stranger: TestClient) -> None:
    fake = facts("52:54:00:00:00:01", disks=[{"name": "vda", "bytes": 1}])
    answer = stranger.post("/api/v1/discover", json=fake)
    assert answer.status_code == 409
    assert "c01" in answer.json()["detail"]
    with db.session() as s:
        status = NodeStates(s).status("c01")
    assert status.facts is None and status.state == "armed"


def test_a_discovered_machine_may_report_again(stranger: TestClient) -> None:
    assert stranger.post("/api/v1/discover", json=facts("52:54:00:00:aa:01")).status_code == 200
    again = stranger.post("/api/v1/discover", json=facts("52:54:00:00:aa:01", cpus=8))
    assert again.json() == {"node": "d52540000aa01"}
    with db.session() as s:
        assert (NodeStates(s).status("d52540000aa01").facts or {})["cpus"] == 8


@pytest.mark.parametrize(
    "body",
    [
        {"mac": "not-a-mac"},
        {"mac": "52:54:00:00:aa:01\nforged"},
        {"cpus": 2},
        {"mac": "52:54:00:00:aa:01", "cpus": -1},
        {"mac": "52:54:00:00:aa:01", "disks": [{}] * 100_000},
        [1, 2, 3],
    ],
)
def test_malformed_discovery_is_a_422(stranger: TestClient, body: object) -> None:
    answer = stranger.post("/api/v1/discover", json=body)
    assert answer.status_code == 422


def test_the_number_of_discovered_nodes_is_capped(
    fixture_cluster: None, settings: Settings
) -> None:
    with client(replace(settings, discovery_max_nodes=3)) as c:
        codes = [
            c.post("/api/v1/discover", json=facts(f"52:54:00:00:bb:{i:02x}")).status_code
            for i in range(5)
        ]
        assert codes == [200, 200, 200, 429, 429]
        # the ones there may still report
        assert c.post("/api/v1/discover", json=facts("52:54:00:00:bb:00")).status_code == 200
    with db.inventory() as inv:
        assert len([n for n in inv.names("node") if n.startswith("d")]) == 3


def test_the_rate_of_new_discovered_nodes_is_capped(
    fixture_cluster: None, settings: Settings
) -> None:
    with client(replace(settings, discovery_per_minute=4)) as c:
        codes = [
            c.post("/api/v1/discover", json=facts(f"52:54:00:00:cc:{i:02x}")).status_code
            for i in range(6)
        ]
    assert codes == [200] * 4 + [429] * 2


def test_a_big_discovery_body_is_refused_before_it_is_read(stranger: TestClient) -> None:
    big = b'{"mac": "52:54:00:00:aa:01", "pad": "' + b"x" * (2 << 20) + b'"}'
    answer = stranger.post(
        "/api/v1/discover", content=big, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    with db.inventory() as inv:
        assert not inv.exists("node", "d52540000aa01")


def test_an_invalid_mac_in_a_boot_script_name_is_a_422(stranger: TestClient) -> None:
    answer = stranger.get("/boot/zz%0aforged.ipxe")
    assert answer.status_code == 422
    assert "forged" not in answer.text
