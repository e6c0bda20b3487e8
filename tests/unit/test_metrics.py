"""The Prometheus metrics: node events in (as the hub publishes them), samples out; the
nodes by state from the database; the image bytes the chunk routes and the transports
sent; /metrics behind the admin token, one registry per app."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from corral.agent import phases
from corral.config import Settings
from corral.deploy import transports
from corral.deploy.service import DeployService
from corral.deploy.transports.base import Meter, RateBudget, Unicast
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.deployments import MeteredFile
from corral.serve.events import Hub, iso
from corral.serve.http import create_app
from corral.serve.metrics import Metrics

T0 = datetime(2026, 12, 3, 12, 0, 0).timestamp()


def _authorize(session: Session, name: str, token: str | None, ip: str) -> None:
    pass


@pytest.fixture
def deploy(settings: Settings) -> DeployService:
    return DeployService(settings, db.session, _authorize)


@pytest.fixture
def metrics(fixture_cluster: None, deploy: DeployService) -> Metrics:
    return Metrics(Hub(), db.session, deploy)


def event(node: str | None, phase: str, at: float = T0, **more: Any) -> dict[str, Any]:
    """An event as the hub publishes it (event_out's keys)."""
    return {
        "id": 1,
        "time": iso(at),
        "node": node,
        "mac": None,
        "phase": phase,
        "message": "",
        "source": "corral",
        "deployment": None,
        "reason": None,
        "during": None,
        "log": None,
    } | more


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_boot_requests_by_step_and_source_unknown_macs_apart(metrics: Metrics) -> None:
    hub = metrics.hub
    hub.publish("event", event("c01", phases.DHCP, source="dhcp"))
    hub.publish("event", event("c01", phases.DHCP, source="dhcp"))
    hub.publish("event", event("c01", phases.LOADER, source="tftp"))
    hub.publish("event", event("c01", phases.KERNEL, source="http"))
    hub.publish("event", event(None, phases.DHCP, source="dhcp", mac="52:54:00:aa:bb:cc"))
    hub.publish("event", event("c01", phases.BOOT_CONFIG, source="10.0.0.11"))
    hub.publish("event", event("c01", phases.BOOTED, source="10.0.0.11"))  # not a boot step
    counted = {
        (s.labels["step"], s.labels["source"], s.labels["known"]): s.value
        for family in metrics.registry.collect()
        if family.name == "corral_boot_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert counted == {
        ("dhcp", "dhcp", "true"): 2,
        ("loader", "tftp", "true"): 1,
        ("kernel", "http", "true"): 1,
        ("dhcp", "dhcp", "false"): 1,
        ("boot-config", "other", "true"): 1,
    }
    assert sample(metrics, "corral_node_events_total", phase="booted") == 1
    assert sample(metrics, "corral_node_events_total", phase="dhcp") == 3


def test_failures_by_reason_and_phase(metrics: Metrics) -> None:
    hub = metrics.hub
    hub.publish("event", event("c01", phases.FAILED, reason=phases.TIMEOUT, during="receiving"))
    hub.publish("event", event("bonded", phases.FAILED, reason=phases.TIMEOUT, during="receiving"))
    hub.publish("event", event("fed01", phases.FAILED, reason="cancelled", during="waiting"))
    hub.publish("event", event("img01", phases.FAILED))  # an old row: no reason, no phase
    failures = "corral_node_failures_total"
    assert sample(metrics, failures, reason="timeout", during="receiving") == 2
    assert sample(metrics, failures, reason="cancelled", during="waiting") == 1
    assert sample(metrics, failures, reason="unknown", during="none") == 1
    assert sample(metrics, failures, reason="silent", during="receiving") is None


def test_phase_durations_from_a_node_s_consecutive_events(metrics: Metrics) -> None:
    hub = metrics.hub
    steps = [
        (phases.DHCP, 0),
        (phases.DHCP, 1),  # DHCP again (offer, then acknowledgement): still in it
        (phases.LOADER, 2),
        (phases.BOOTED, 40),
        (phases.RECEIVING, 100),
        (phases.FAILED, 1900),
        ("armed", 90_000),  # re-armed the next day: no phase lasted that long
        (phases.DHCP, 90_200),
    ]
    for phase, at in steps:
        hub.publish("event", event("c01", phase, T0 + at))
    hub.publish("event", event("bonded", phases.DHCP, T0 + 5))  # another node, not mixed in
    hub.publish("event", event(None, phases.DHCP, T0 + 6))  # unknown machine: no node
    durations = "corral_phase_duration_seconds"

    def observed(phase: str) -> tuple[float | None, float | None]:
        return (
            sample(metrics, f"{durations}_count", phase=phase),
            sample(metrics, f"{durations}_sum", phase=phase),
        )

    assert observed("dhcp") == (1, 2)
    assert observed("loader") == (1, 38)
    assert observed("booted") == (1, 60)
    assert observed("receiving") == (1, 1800)
    assert observed("failed") == (None, None)
    assert observed("armed") == (None, None)
    # buckets that fit: 30 min of receiving is within the 1800 s one, not the 1200 s one
    assert sample(metrics, f"{durations}_bucket", phase="receiving", le="1200.0") == 0
    assert sample(metrics, f"{durations}_bucket", phase="receiving", le="1800.0") == 1


def test_boot_steps_of_a_node_at_rest_are_not_a_new_boot(metrics: Metrics) -> None:
    hub = metrics.hub
    for phase, at in [
        (phases.REBOOTING, 0),
        (phases.DHCP, 20),  # its firmware's PXE, told to boot from disk: history
        (phases.BOOT_CONFIG, 21),
        (phases.FIRST_BOOT, 80),
        (phases.DHCP, 3600),  # its installed system renews its lease: history
        (phases.POWER_OPERATION, 7200),  # an administrator's power cycle: history too
        (phases.DHCP, 7220),
    ]:
        hub.publish("event", event("c01", phase, T0 + at))
    durations = "corral_phase_duration_seconds"
    assert sample(metrics, f"{durations}_sum", phase="rebooting") == 80
    assert sample(metrics, f"{durations}_count", phase="dhcp") is None
    assert sample(metrics, f"{durations}_count", phase="first-boot") is None
    assert sample(metrics, f"{durations}_count", phase="power") is None


def test_nodes_by_state_deployments_and_stream_clients(metrics: Metrics) -> None:
    with db.session() as s:
        states = NodeStates(s)
        states.record("c01", phases.BOOTED, "up", "test")
        states.record("bonded", phases.FAILED, "gone", "test", reason=phases.POWER)
        states.record("fed01", phases.INSTALL_FINISHED, "", "test")
        total = len(states.statuses())
    metrics.hub.clients = 2
    nodes = "corral_nodes"
    assert sample(metrics, nodes, state="installing") == 1
    assert sample(metrics, nodes, state="failed") == 1
    assert sample(metrics, nodes, state="installed") == 1
    assert sample(metrics, nodes, state="armed") == total - 3  # never seen: armed
    assert sample(metrics, nodes, state="running") == 0  # every state has its series
    assert sample(metrics, "corral_deployments_running") == 0
    assert sample(metrics, "corral_event_stream_clients") == 2


class Seeding(Unicast):
    """A transport that sends by its own means (as multicast's udp-sender)."""

    name = "seeding"
    export = "stream"
    sent_so_far: ClassVar[dict[str, int]] = {}

    def __init__(self, settings: Settings) -> None:
        pass

    def prepare(self, payload: Any) -> None:
        pass

    def params(self, payload: Any, node: str) -> dict[str, Any]:
        return {}

    def sent(self) -> dict[str, int]:
        return dict(self.sent_so_far)

    def close(self) -> None:
        pass


@pytest.fixture
def seeding() -> Iterator[None]:
    transports.register("seeding", Seeding)
    yield
    transports.REGISTRY.pop("seeding", None)


def test_image_bytes_by_transport_and_export(
    metrics: Metrics, deploy: DeployService, seeding: None
) -> None:
    sent = "corral_image_bytes_sent_total"
    assert sample(metrics, sent, transport="http", image="small:1") is None
    deploy.served.add("small:1", 4096)
    deploy.served.add("small:1", 1000)
    deploy.served.add("small:1/squashfs", 77)
    deploy.transports.get("http")  # started, sends nothing itself
    deploy.transports.get("seeding")
    Seeding.sent_so_far = {"small:1": 123_456}
    assert sample(metrics, sent, transport="http", image="small:1") == 5096
    assert sample(metrics, sent, transport="http", image="small:1/squashfs") == 77
    assert sample(metrics, sent, transport="seeding", image="small:1") == 123_456


def test_a_meter_adds_live_counts_to_the_kept_ones() -> None:
    meter = Meter()
    meter.add("a:1", 10)
    meter.add("a:1", 0)
    assert meter.read() == {"a:1": 10}
    assert meter.read(("a:1", 5), ("b:2", 7)) == {"a:1": 15, "b:2": 7}
    assert meter.read() == {"a:1": 10}


def test_a_metered_file_counts_what_it_sent(tmp_path: Path) -> None:
    path = tmp_path / "00000000.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    meter = Meter()
    app = FastAPI()

    @app.get("/chunk")
    def chunk() -> MeteredFile:
        return MeteredFile(path, meter, "small:1")

    with TestClient(app) as client:
        assert len(client.get("/chunk").content) == 10_240
        assert meter.read() == {"small:1": 10_240}
        part = client.get("/chunk", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and len(part.content) == 100
        assert meter.read() == {"small:1": 10_340}


def test_a_metered_file_with_a_budget_waits_its_turn(tmp_path: Path) -> None:
    path = tmp_path / "00000000.bin"
    path.write_bytes(os.urandom(512 << 10))
    budget = RateBudget(8_000_000, burst=64 << 10)  # 1 MB/s, as multicast's catch-ups
    app = FastAPI()

    @app.get("/chunk")
    def chunk() -> MeteredFile:
        return MeteredFile(path, Meter(), "small:1", budget)

    with TestClient(app) as client:
        started = time.monotonic()
        assert client.get("/chunk").content == path.read_bytes()
        # 512 KiB at 1 MB/s, the first 64 KiB at once: 0.46 s at least
        assert time.monotonic() - started >= 0.45


def test_metrics_need_the_admin_token_and_each_app_has_its_registry(
    fixture_cluster: None, settings: Settings
) -> None:
    service = BootService(settings, db.engine())
    first, second = create_app(service, "secret"), create_app(service, "secret")
    with (
        TestClient(first) as client,
        TestClient(second, cookies={"corral_token": "secret"}) as other,  # as the dashboard
    ):
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with db.session() as s:
            NodeStates(s).record("c01", phases.FAILED, "x", "test", reason=phases.SILENT)
        answer = client.get("/metrics", headers={"Authorization": "Bearer secret"})
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        text = answer.text
        assert 'corral_nodes{state="failed"} 1.0' in text
        assert 'corral_node_failures_total{during="none",reason="silent"} 1.0' in text
        assert "# TYPE corral_phase_duration_seconds histogram" in text
        # both apps count the event (both hubs got it), each in its own registry
        assert 'reason="silent"} 1.0' in other.get("/metrics").text
        scraped = client.get(
            "/metrics",
            headers={"Authorization": "Bearer secret", "Accept": "application/openmetrics-text"},
        )
        assert scraped.headers["content-type"].startswith("application/openmetrics-text")
        assert scraped.text.endswith("# EOF\n")
    assert first.state.metrics.registry is not second.state.metrics.registry


def test_every_metric_is_documented(metrics: Metrics) -> None:
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    suffix = {"counter": "_total", "info": "_info"}  # as exposed
    names = {f.name + suffix.get(f.type, "") for f in metrics.registry.collect()}
    assert len(names) == 10
    assert [name for name in sorted(names) if f"| `{name}` |" not in docs] == []


def test_boot_steps_as_corral_stores_them_are_counted_by_protocol(metrics: Metrics) -> None:
    # the recorder stores a step with the client's address (or dnsmasq) as its source
    hub = metrics.hub
    hub.publish("event", event("c01", phases.DHCP, source="dnsmasq", message="10.0.0.11 offered"))
    loader = "ipxe.efi over TFTP (850.5 kB)"
    hub.publish("event", event("c01", phases.LOADER, source="10.0.0.11", message=loader))
    kernel = "vmlinuz over HTTP"
    hub.publish("event", event("c01", phases.KERNEL, source="10.0.0.11", message=kernel))
    assert (
        sample(metrics, "corral_boot_requests_total", step="dhcp", source="dhcp", known="true") == 1
    )
    assert (
        sample(metrics, "corral_boot_requests_total", step="loader", source="tftp", known="true")
        == 1
    )
    assert (
        sample(metrics, "corral_boot_requests_total", step="kernel", source="http", known="true")
        == 1
    )
