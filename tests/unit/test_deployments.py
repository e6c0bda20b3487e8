"""Deployments: the checks before anything is written, progress, cancel, time-outs, plans.

The transport here is a fake (recording what it was asked): these tests are about the
orchestration around transports; the real ones are exercised in tests/integration.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy.orm import Session

from corral.agent.plan import Diskless, Plan, Progress
from corral.config import Settings
from corral.deploy import transports
from corral.deploy.diskless import DisklessError
from corral.deploy.service import DeployService, report_interval
from corral.deploy.store import DeployError, Deployments, new_deployment
from corral.deploy.transports.base import NotReady, Unicast
from corral.errors import NotFound
from corral.images.catalog import image_store
from corral.images.exports import Chunked, build_exports
from corral.images.store import ImageNotFound, ImageVersion
from corral.inventory import db
from corral.inventory.noderange import expand
from corral.inventory.schema import GroupSpec, InterfaceSpec, NodeSpec, Partition, ProfileSpec
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService, Forbidden


class FakeTransport(Unicast):
    name = "fake"
    export = "stream"
    prepared: ClassVar[list[str]] = []

    def __init__(self, settings: Settings) -> None:
        pass

    def prepare(self, version: ImageVersion) -> None:
        FakeTransport.prepared.append(version.ref)

    def params(self, version: ImageVersion, node: str) -> dict[str, Any]:
        return {"where": f"fake://{version.ref}/{node}"}

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_transport() -> Iterator[None]:
    transports.register("fake", FakeTransport)
    FakeTransport.prepared = []
    yield
    transports.REGISTRY.pop("fake", None)


@pytest.fixture
def image(home: Path, tmp_path: Path) -> ImageVersion:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=test\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(5000))
    return image_store(home).import_tree("small", tree)


@pytest.fixture
def nodes(home: Path) -> None:
    with db.inventory() as inv:
        inv.add(
            "profile",
            [
                ProfileSpec(
                    name="img",
                    image="small",
                    partitions=[Partition(mount="/", fstype="ext4", size_mb=512, grow=True)],
                    variables={
                        "power_command": "true {node}",
                        "ssh_authorized_keys": ["ssh-ed25519 AAAA x"],
                    },
                )
            ],
        )
        inv.add(
            "node",
            [
                NodeSpec(
                    name=f"n{i:02d}",
                    profiles=["img"],
                    install_method="image",
                    interfaces=[
                        InterfaceSpec(mac=f"52:54:00:00:01:{i:02x}", ip=f"10.0.0.{10 + i}")
                    ],
                )
                for i in range(1, 5)
            ],
        )


def start(noderange: str, image: str | None = None, transport: str = "fake") -> int:
    with db.session() as s:
        return new_deployment(s, image_store(db.settings().home), noderange, image, transport)


def test_a_deployment_arms_its_nodes_and_waits(nodes: None, image: ImageVersion) -> None:
    ident = start("n[01-03]")
    with db.session() as s:
        d = Deployments(s).get(ident)
        assert [n.node for n in d.nodes] == ["n01", "n02", "n03"]
        assert {n.phase for n in d.nodes} == {"waiting"}
        assert {n.image for n in d.nodes} == {"small:1"}
        assert d.nodes[0].total > 0  # the stream export was made
        assert NodeStates(s).status("n01").state == "armed"
        assert NodeStates(s).events("n01")[-1].phase == "armed"
        assert NodeStates(s).events("n04") == []


@pytest.mark.parametrize(
    ("noderange", "img", "transport", "error", "words"),
    [
        ("n[01-09]", None, "fake", NotFound, "n[05-09]"),
        ("n01", "nosuch", "fake", ImageNotFound, "nosuch"),
        ("n01", None, "carrier-pigeon", DeployError, "unknown transport"),
    ],
)
def test_bad_requests_write_nothing(
    nodes: None,
    image: ImageVersion,
    noderange: str,
    img: str | None,
    transport: str,
    error: type[Exception],
    words: str,
) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[")):
        start(noderange, img, transport)
    with db.session() as s:
        assert Deployments(s).recent() == []
        assert NodeStates(s).events("n01") == []


def test_a_node_already_deploying_is_refused(nodes: None, image: ImageVersion) -> None:
    first = start("n[01-02]")
    with pytest.raises(DeployError, match=rf"n02 already deploying \(deployment {first}\)"):
        start("n[02-03]")


def test_a_node_without_an_image_is_refused(nodes: None, image: ImageVersion) -> None:
    with db.inventory() as inv:
        inv.update("profile", ["img"], {"image": None})
    with pytest.raises(DeployError, match="n01 has no image"):
        start("n01")
    start("n01", image="small")  # --image fills in


def test_a_disk_known_to_be_too_small_is_refused(nodes: None, image: ImageVersion) -> None:
    with db.session() as s:
        NodeStates(s)._row("n01").facts = {"disks": [{"name": "vda", "size_bytes": 100 << 20}]}
    with pytest.raises(DeployError, match="n01: disk of 100 MiB is too small"):
        start("n01")


def test_layers_a_profile_asks_for_must_be_in_the_image(nodes: None, image: ImageVersion) -> None:
    with db.inventory() as inv:
        inv.update("profile", ["img"], {"layers": ["gpu"]})
    with pytest.raises(DeployError, match="was not built with layer gpu"):
        start("n01")


def test_progress_to_done_and_failed_ends_the_deployment(nodes: None, image: ImageVersion) -> None:
    ident = start("n[01-02]")
    with db.session() as s:
        store = Deployments(s)
        store.report(ident, "n01", Progress("receiving", 10, 100), "10.0.0.11")
        store.report(ident, "n01", Progress("done", 100, 100), "10.0.0.11")
        assert store.get(ident).state == "running"
        store.report(ident, "n02", Progress("failed", 5, 100, "disk gone", "tail"), "10.0.0.12")
        d = store.get(ident)
        assert d.state == "failed" and d.finished
        # the image is on its disk: "installed" is for its installed system to say
        assert NodeStates(s).status("n01").state == "deployed"
        assert NodeStates(s).status("n02").state == "failed"
        assert store.member(ident, "n02").log_tail == "tail"
        # a late report changes nothing
        store.report(ident, "n01", Progress("receiving", 1, 100), "10.0.0.11")
        assert store.member(ident, "n01").phase == "done"
    start("n[01-02]")  # both free again


def test_an_installed_system_proves_itself_with_its_first_boot(
    home: Path, nodes: None, image: ImageVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's done puts the image on the disk; only the installed system's first-boot
    report, with the node's token from the node's address, makes the node installed."""
    ident = start("n[01-03]")
    with db.session() as s:
        tokens = {name: NodeStates(s).issue_token(name) for name in ("n01", "n02", "n03")}
        store = Deployments(s)
        done = Progress("done", 100, 100, "installed", first_boot=True, reboot=True)
        store.report(ident, "n01", done, "10.0.0.11")
        store.report(ident, "n02", done, "10.0.0.12")
        store.report(ident, "n03", Progress("done", 100, 100, first_boot=True), "10.0.0.13")
        status = NodeStates(s).status("n01")
        assert (status.state, status.phase) == ("deployed", "rebooting")
        assert NodeStates(s).status("n03").phase == "deployed"  # did not reboot: no timer
    service = BootService(db.settings(), db.engine())
    with pytest.raises(Forbidden, match="only to its own address"):
        service.event("n01", tokens["n01"], "first-boot", "up", "10.0.0.99")
    answer = service.event("n01", tokens["n01"], "first-boot", "n01 up", "10.0.0.11")
    assert answer["state"] == "installed"
    with pytest.raises(Forbidden):  # the token did its job: it is spent
        service.event("n01", tokens["n01"], "first-boot", "again", "10.0.0.11")
    # n02 never calls back: failed once firstboot_timeout has passed, with the reason
    clock = Clock(monkeypatch)
    with _service(home) as deploys, ThreadPoolExecutor(1) as pool:
        deploys.tick(pool)
        with db.session() as s:
            assert NodeStates(s).status("n02").state == "deployed"
        clock.now += deploys.settings.firstboot_timeout + 1
        deploys.tick(pool)
    with db.session() as s:
        status = NodeStates(s).status("n02")
        assert status.state == "failed"
        assert "first-boot: rebooted into its installed system at" in (status.message or "")
        assert "did not report within 900 s" in (status.message or "")
        assert NodeStates(s).status("n03").state == "deployed"
        assert NodeStates(s).status("n01").state == "installed"


def test_cancel(nodes: None, image: ImageVersion) -> None:
    ident = start("n[01-02]")
    with db.session() as s:
        assert Deployments(s).cancel(ident) == 2
        assert {n.phase for n in Deployments(s).get(ident).nodes} == {"cancelled"}
    with db.session() as s, pytest.raises(DeployError, match="has ended"):
        Deployments(s).cancel(ident)


@contextmanager
def _service(home: Path, settings: Settings | None = None) -> Iterator[DeployService]:
    def authorize(session: Session, name: str, token: str | None, ip: str) -> None:
        if token != "good":
            raise Forbidden(f"bad or missing token for node {name}")

    yield DeployService(settings or db.settings(), db.session, authorize)


def test_the_plan_says_what_the_node_gets(home: Path, nodes: None, image: ImageVersion) -> None:
    ident = start("n01")
    with _service(home) as service:
        with pytest.raises(Forbidden):
            service.plan("n01", None, "10.0.0.11")
        assert service.plan("n02", "good", "10.0.0.12") is None  # nothing to do: 204
        # ... and the node's status says so, once
        assert service.plan("n02", "good", "10.0.0.12") is None
        with db.session() as s:
            status = NodeStates(s).status("n02")
            assert status.phase == "waiting"
            assert "no deployment includes it" in (status.message or "")
            assert "'corral deploy n02'" in (status.message or "")
            assert [e.phase for e in NodeStates(s).events("n02")] == ["waiting"]
        plan = Plan.from_dict(service.plan("n01", "good", "10.0.0.11") or {})
    assert plan.deployment == ident and plan.node == "n01"
    assert plan.transport.params == {"where": "fake://small:1/n01"}
    assert plan.image.ref == "small:1" and plan.image.chunks
    assert sum(c.size for c in plan.image.chunks) == plan.image.stream_size
    assert [p.mount for p in plan.disk.partitions] == ["/"]
    assert plan.identity.hostname == "n01"
    assert plan.identity.interfaces[0].ip == "10.0.0.11"
    assert plan.identity.authorized_keys == ["ssh-ed25519 AAAA x"]
    assert set(plan.identity.ssh_host_keys) >= {"ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"}
    # the same keys the next time: a re-deployed node keeps its host keys
    with db.session() as s:
        Deployments(s).cancel(ident)
    start("n01")
    with _service(home) as service:
        again = Plan.from_dict(service.plan("n01", "good", "10.0.0.11") or {})
    assert again.identity.ssh_host_keys == plan.identity.ssh_host_keys
    assert plan.report_interval == 1.0


@pytest.mark.parametrize(
    ("nodes", "seconds"), [(1, 1.0), (20, 1.0), (50, 2.5), (100, 5.0), (1000, 5.0)]
)
def test_report_interval_grows_with_the_deployment(nodes: int, seconds: float) -> None:
    assert report_interval(nodes) == seconds
    assert report_interval(nodes) < Settings(home=Path("/")).deploy_node_timeout / 4


def test_the_manager_powers_nodes_and_fails_silent_ones(
    home: Path, nodes: None, image: ImageVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    ident = start("n[01-02]")
    with _service(home) as service, ThreadPoolExecutor(2) as pool:
        service.tick(pool)
        assert FakeTransport.prepared  # made ready before any node is rebooted
        with db.session() as s:
            rows = Deployments(s).get(ident).nodes
            assert all(r.powered for r in rows)
            assert rows[0].message == "power-cycling it through command"
        report = {"phase": "receiving", "bytes": 5}
        service.progress(ident, "n01", "good", report, "10.0.0.11")
        service.progress(ident, "n02", "good", report, "10.0.0.12")
        clock = Clock(monkeypatch)
        # the server itself is held up for 40 s (its host's disk or CPU): nobody is failed
        clock.now += 40
        service.tick(pool)
        assert phases(ident) == {"n01": "receiving", "n02": "receiving"}
        # then n02 goes silent while n01 reports: one tick a second, n02 alone is failed
        for _ in range(int(service.settings.deploy_node_timeout) + 1):
            clock.now += 1
            service.progress(ident, "n01", "good", report, "10.0.0.11")
            service.tick(pool)
    with db.session() as s:
        rows = {r.node: r for r in Deployments(s).get(ident).nodes}
        assert rows["n01"].phase == "receiving"
        assert rows["n02"].phase == "failed"
        assert "no report for 26 s in phase receiving" in rows["n02"].message


class Clock:
    """corral.deploy.service's time.time(), moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import time

        self.now = time.time()
        monkeypatch.setattr("corral.deploy.service.time.time", lambda: self.now)


def test_a_node_whose_bmc_fails_is_failed_in_phase_power_and_the_others_go_on(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    """n02's power driver fails (its command exits 1): n02 is failed with reason power,
    in phase power, the command's complaint in its message; n01 is power-cycled."""
    with db.inventory() as inv:
        inv.edit(
            "node",
            ["n02"],
            {"power": {"driver": "command", "command": "sh -c 'echo BMC busy >&2; exit 1'"}},
        )
    ident = start("n[01-02]")
    with _service(home) as service, ThreadPoolExecutor(2) as pool:
        service.tick(pool)
    with db.session() as s:
        rows = {r.node: r for r in Deployments(s).get(ident).nodes}
        assert rows["n01"].phase == "waiting"
        assert rows["n02"].phase == "failed"
        assert "power cycle failed" in rows["n02"].message
        assert "BMC busy" in rows["n02"].message
        failure = NodeStates(s).events("n02")[-1]
        assert (failure.phase, failure.reason, failure.during) == ("failed", "power", "power")
        powered = [e for e in NodeStates(s).events("n01") if e.phase == "power"]
        assert powered and powered[-1].message.startswith("power cycle through command")


def phases(ident: int) -> dict[str, str]:
    with db.session() as s:
        return {r.node: r.phase for r in Deployments(s).get(ident).nodes}


def test_sessions_start_once_per_image_and_end_with_their_nodes(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    started: list[tuple[int, str, list[str]]] = []
    finished: list[tuple[int, str]] = []

    class Broadcast(FakeTransport):
        def start(self, deployment: int, version: ImageVersion, members: Any) -> None:
            started.append((deployment, version.ref, [(x.node, x.ip, x.rack) for x in members]))

        def finish(self, deployment: int, version: ImageVersion) -> None:
            finished.append((deployment, version.ref))

    transports.register("fake", Broadcast)
    with db.inventory() as inv:  # n01's rack from its group, n02 in none
        inv.add("group", [GroupSpec(name="r2", variables={"rack": "r2"})])
        inv.update("node", ["n01"], {"groups": ["r2"]})
    ident = start("n[01-02]")
    with _service(home) as service, ThreadPoolExecutor(2) as pool:
        service.tick(pool)
        service.tick(pool)
        assert started == [
            (ident, "small:1", [("n01", "10.0.0.11", "r2"), ("n02", "10.0.0.12", None)])
        ]
        for node in ("n01", "n02"):
            service.progress(ident, node, "good", {"phase": "done"}, "10.0.0.1")
        service.tick(pool)
    assert finished == [(ident, "small:1")]


def test_a_node_removed_from_the_inventory_ends_its_part(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    ident = start("n[01-02]")
    with db.inventory() as inv:
        inv.remove("node", ["n02"])
    with _service(home) as service, ThreadPoolExecutor(2) as pool:
        service.tick(pool)
    with db.session() as s:
        row = Deployments(s).member(ident, "n02")
        assert row.phase == "failed" and "removed" in row.message
        assert Deployments(s).cancel(ident) == 1  # n01 only; no error for the removed one


def test_auto_picks_by_the_crossovers(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.deploy import auto

    monkeypatch.setattr(
        auto,
        "CROSSOVERS",
        (auto.Crossover("chain", 20, 1 << 20), auto.Crossover("multicast", 5, 1 << 20)),
    )
    assert auto.choose(1, 64 << 20, ["http", "chain", "multicast"]) == "http"
    assert auto.choose(10, 64 << 20, ["http", "chain", "multicast"]) == "multicast"
    assert auto.choose(50, 64 << 20, ["http", "chain", "multicast"]) == "chain"
    assert auto.choose(50, 64 << 20, ["http", "multicast"]) == "multicast"
    assert auto.choose(50, 1000, ["http", "chain", "multicast"]) == "http"  # tiny image


def test_auto_follows_the_measured_crossovers() -> None:
    """The shipped table: unicast up to 15 nodes or for small images, the chain beyond."""
    from corral.deploy.auto import choose

    everything = ["http", "rsync", "multicast", "bittorrent", "chain"]
    debian = 185 << 20  # the minimal Debian 12 image's stream
    assert choose(1, debian, everything) == "http"
    assert choose(15, debian, everything) == "http"
    assert choose(16, debian, everything) == "chain"
    assert choose(100, debian, everything) == "chain"
    assert choose(100, 10 << 20, everything) == "http"  # too small to repay a chain
    assert choose(100, debian, ["http", "rsync"]) == "http"


def test_auto_resolves_per_image_and_is_recorded(
    nodes: None, image: ImageVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.deploy import auto

    monkeypatch.setattr(auto, "CROSSOVERS", (auto.Crossover("fake", 3, 0),))
    ident = start("n[01-04]", transport="auto")
    with db.session() as s:
        d = Deployments(s).get(ident)
        assert d.transport == "auto"
        assert {n.transport for n in d.nodes} == {"fake"}


@contextmanager
def node_n01_over_http() -> Iterator[tuple[Any, int, dict[str, str]]]:
    """n01 in a new deployment, talking to corral's HTTP routes from its own address:
    (client, deployment, the headers with its token)."""
    from fastapi.testclient import TestClient

    from corral.serve.http import create_app

    ident = start("n01")
    with db.session() as s:
        token = NodeStates(s).issue_token("n01")
    service = BootService(db.settings(), db.engine())
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(service, "admin"), client=("10.0.0.11", 40000)) as node:
        yield node, ident, auth


def test_the_agents_final_report_and_the_first_boot_over_http(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    """The routes the agent and the installed system call: the final progress report's
    first_boot and reboot reach the life cycle (they did not, once: the route's model
    dropped them), and the first-boot event makes the node installed."""
    with node_n01_over_http() as (node, ident, auth):
        done = {"phase": "done", "bytes": 1, "total": 1, "first_boot": True, "reboot": True}
        answer = node.post(
            f"/api/v1/deployments/{ident}/nodes/n01/progress", json=done, headers=auth
        )
        assert answer.status_code == 200, answer.text
        with db.session() as s:
            status = NodeStates(s).status("n01")
            assert (status.state, status.phase) == ("deployed", "rebooting")
        event = {"phase": "first-boot", "message": "n01 runs its installed system"}
        answer = node.post("/api/v1/nodes/n01/events", json=event, headers=auth)
        assert answer.status_code == 200 and answer.json()["state"] == "installed"


def test_the_chunk_bytes_a_node_fetched_are_in_the_metrics(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    with node_n01_over_http() as (node, _, auth):
        chunk = node.get("/images/small/1/chunks/00000000.bin", headers=auth)
        assert chunk.status_code == 200, chunk.text
        part = node.get(
            "/images/small/1/chunks/00000000.bin", headers=auth | {"Range": "bytes=0-99"}
        )
        assert part.status_code == 206
        metrics = node.get("/metrics", headers={"Authorization": "Bearer admin"}).text
        sent = len(chunk.content) + 100
        assert f'corral_image_bytes_sent_total{{image="small:1",transport="http"}} {sent}.0' in (
            metrics
        )


class Gathering(FakeTransport):
    """No plan for anyone until n01 and n02 have both asked (as a chain forms)."""

    asked: ClassVar[list[str]] = []

    def params(self, version: ImageVersion, node: str) -> dict[str, Any]:
        Gathering.asked.append(node)
        if not {"n01", "n02"} <= set(Gathering.asked):
            raise NotReady(f"{node} waits for the others")
        return super().params(version, node)


@pytest.fixture
def gathering() -> None:
    transports.register("fake", Gathering)
    Gathering.asked = []


def test_the_node_that_completes_a_gathering_rings_for_the_others(
    home: Path, nodes: None, image: ImageVersion, gathering: None
) -> None:
    start("n[01-02]")
    with _service(home) as service:
        assert service.plan("n01", "good", "10.0.0.11") is None
        rings = service.plans.rings
        assert service.plan("n02", "good", "10.0.0.12") is not None
        assert service.plans.rings == rings + 1  # n01 may have its plan now
        assert service.plan("n01", "good", "10.0.0.11") is not None
        assert service.plans.rings == rings + 1  # nobody was held since: no ring


def test_a_session_started_rings_for_the_nodes_that_asked_early(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    start("n01")
    with _service(home) as service, ThreadPoolExecutor(1) as pool:
        rings = service.plans.rings
        service.tick(pool)
        assert service.plans.rings == rings + 1
        service.tick(pool)  # the same session: not started again
        assert service.plans.rings == rings + 1


def test_a_held_plan_request_is_answered_when_the_last_node_asks(
    home: Path, nodes: None, image: ImageVersion, gathering: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n01 asks with ``?wait=`` and is held; n02's request completes the gathering, and
    n01's request is answered with its plan at once (not at its next look, which this
    test puts an hour away)."""
    from fastapi.testclient import TestClient

    from corral.serve import deployments
    from corral.serve.http import create_app

    monkeypatch.setattr(deployments, "PLAN_RECHECK", 3600.0)
    start("n[01-02]")
    with db.session() as s:
        auth = {
            n: {"Authorization": f"Bearer {NodeStates(s).issue_token(n)}"} for n in ("n01", "n02")
        }
    answers: dict[str, Any] = {}
    with TestClient(create_app(BootService(db.settings(), db.engine()), "admin")) as client:

        def ask(node: str) -> None:
            answers[node] = client.get(f"/api/v1/nodes/{node}/plan?wait=60", headers=auth[node])

        held = threading.Thread(target=ask, args=("n01",))
        held.start()
        try:
            for _ in range(2000):  # until n01 has asked, and is held
                if "n01" in Gathering.asked:
                    break
                threading.Event().wait(0.01)
            ask("n02")
        finally:
            held.join(30)
        assert not held.is_alive(), "n01's request was not answered when n02 asked"
        assert answers["n02"].status_code == 200
        assert answers["n01"].status_code == 200, answers["n01"].text
        assert answers["n01"].json()["node"] == "n01"
        assert Gathering.asked.count("n01") == 2  # held once, asked again when rung

        # without the others, a held request ends in a 204 at its wait, having looked
        # again meanwhile; without wait, at once
        monkeypatch.setattr(deployments, "PLAN_RECHECK", 0.1)
        Gathering.asked = []
        answer = client.get("/api/v1/nodes/n01/plan?wait=0.5", headers=auth["n01"])
        assert answer.status_code == 204 and Gathering.asked.count("n01") >= 3
        Gathering.asked = []
        answer = client.get("/api/v1/nodes/n01/plan", headers=auth["n01"])
        assert answer.status_code == 204 and Gathering.asked == ["n01"]
        for bad in ("61", "-1", "soon"):
            answer = client.get(f"/api/v1/nodes/n01/plan?wait={bad}", headers=auth["n01"])
            assert answer.status_code == 422, bad


class Joining(FakeTransport):
    """Records the sessions its nodes say they joined (as multicast starts on them)."""

    joins: ClassVar[list[tuple[int, str, str]]] = []

    def joined(self, deployment: int, node: str, tag: str) -> bool:
        Joining.joins.append((deployment, node, tag))
        return tag == "mine"


def test_a_node_that_joined_its_session_tells_the_transport(
    home: Path, nodes: None, image: ImageVersion, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's report that its receiver joined reaches the node's transport, whose
    session may start on it; a bar-only report does not, and neither does any report
    of a node whose token is wrong."""
    transports.register("fake", Joining)
    Joining.joins = []
    with node_n01_over_http() as (node, ident, auth):
        path = f"/api/v1/deployments/{ident}/nodes/n01/progress"
        for body in (
            {"phase": "receiving", "bytes": 0, "total": 9},
            {"phase": "receiving", "bytes": 0, "total": 9, "joined": "mine"},
            {"phase": "receiving", "bytes": 5, "total": 9},
        ):
            answer = node.post(path, json=body, headers=auth)
            assert answer.status_code == 200, answer.text
        assert Joining.joins == [(ident, "n01", "mine")]
        forged = {"Authorization": "Bearer wrong"}
        body = {"phase": "receiving", "joined": "mine"}
        assert node.post(path, json=body, headers=forged).status_code in (401, 403)
        assert Joining.joins == [(ident, "n01", "mine")]
        with caplog.at_level(logging.WARNING, logger="corral.deploy"):
            body = {"phase": "receiving", "joined": "theirs"}
            assert node.post(path, json=body, headers=auth).status_code == 200
        assert f"n01 says it joined session theirs, which deployment {ident}" in caplog.text


def test_a_nodes_phase_is_its_deployment_step_and_it_reports_only_its_own(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    """One phase vocabulary: while a node deploys, its phase is the step its agent
    reports (not a generic "progress"); the phases corral records for it (rebooting,
    deployed, waiting) cannot be posted by the node itself."""
    with node_n01_over_http() as (node, ident, auth):
        step = {"phase": "receiving", "bytes": 1, "total": 2}
        answer = node.post(
            f"/api/v1/deployments/{ident}/nodes/n01/progress", json=step, headers=auth
        )
        assert answer.status_code == 200, answer.text
        with db.session() as s:
            status = NodeStates(s).status("n01")
            assert (status.state, status.phase) == ("installing", "receiving")
        for phase in ("deployed", "rebooting", "waiting", "progress"):
            event = {"phase": phase, "message": "forged"}
            answer = node.post("/api/v1/nodes/n01/events", json=event, headers=auth)
            assert answer.status_code == 422, (phase, answer.text)
            assert "does not report phase" in answer.text
        with db.session() as s:
            assert NodeStates(s).status("n01").phase == "receiving"


# --- diskless boots ---------------------------------------------------------------------


def make_diskless(names: str) -> None:
    with db.inventory() as inv:
        inv.update("node", expand(names), {"install_method": "diskless"})


def test_corral_boot_sends_the_squashfs_and_a_diskless_plan(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    refused = pytest.raises(DisklessError, match="n01 installs by image, it is not diskless")
    with refused, db.session() as s:
        new_deployment(s, image_store(home), "n01", None, "fake", kind="diskless")
    make_diskless("n[01-02]")
    with db.session() as s:
        ident = new_deployment(s, image_store(home), "n[01-02]", None, "fake", kind="diskless")
        d = Deployments(s).get(ident)
        assert d.kind == "diskless" and d.gather_until is None
        assert NodeStates(s).events("n01") == []  # not armed: nothing is installed
        squashfs = Chunked(image_store(home).get_ref("small:1"), "squashfs").index()
        assert d.nodes[0].total == squashfs["size"]
    with _service(home) as service, ThreadPoolExecutor(1) as pool:
        service.tick(pool)
        plan = Plan.from_dict(service.plan("n01", "good", "10.0.0.11") or {})
    assert plan.mode == "diskless" and plan.diskless == Diskless()
    assert plan.image.stream_sha256 == squashfs["sha256"] and plan.image.tree_bytes == 0
    assert FakeTransport.prepared[-1] == "small:1/squashfs"
    assert len(plan.identity.machine_id) == 32
    with db.session() as s:
        Deployments(s).report(ident, "n01", Progress("done", 1, 1, "in RAM"), "10.0.0.11")
        status = NodeStates(s).status("n01")
    assert (status.state, status.phase) == ("booting", "starting")
    boot = BootService(db.settings(), db.engine())
    token = boot.token_cpio("n01", "10.0.0.11")  # any boot of a diskless node gets one
    assert token
    with db.session() as s:
        assert NodeStates(s).status("n01").state == "booting"


def test_nodes_booting_on_their_own_are_gathered_into_one_session(
    home: Path, nodes: None, image: ImageVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_diskless("n[01-04]")
    build_exports(image_store(home).get_ref("small:1"), which=["squashfs"])
    settings = dataclasses.replace(db.settings(), diskless_transport="fake")
    clock = Clock(monkeypatch)
    with _service(home, settings) as service, ThreadPoolExecutor(1) as pool:
        assert service.plan("n01", "good", "10.0.0.11") is None  # gathering: 204
        clock.now += 3
        assert service.plan("n02", "good", "10.0.0.12") is None
        service.tick(pool)
        assert service.plan("n01", "good", "10.0.0.11") is None  # still within the window
        clock.now += service.settings.diskless_window
        service.tick(pool)  # the window closed: one session for both
        first = Plan.from_dict(service.plan("n01", "good", "10.0.0.11") or {})
        second = Plan.from_dict(service.plan("n02", "good", "10.0.0.12") or {})
        assert first.deployment == second.deployment and first.mode == "diskless"
        late = service.plan("n03", "good", "10.0.0.13")  # after the window: the next one
        assert late is None
    with db.session() as s:
        rows = Deployments(s).recent()
        assert [(d.noderange, d.kind) for d in rows] == [
            ("n03", "diskless"),
            ("n[01-02]", "diskless"),
        ]


def test_diskless_nodes_arriving_together_open_one_session(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    make_diskless("n[01-04]")
    build_exports(image_store(home).get_ref("small:1"), which=["squashfs"])
    settings = dataclasses.replace(db.settings(), diskless_transport="fake")
    names = ["n01", "n02", "n03", "n04"]
    gate = threading.Barrier(len(names))

    def arrive(name: str) -> object:
        gate.wait()
        return service.plan(name, "good", f"10.0.0.{10 + int(name[1:])}")

    with _service(home, settings) as service, ThreadPoolExecutor(len(names)) as pool:
        for _ in range(5):  # a race lost once in a few tries is still a race
            with db.session() as s:
                for d in Deployments(s).recent():
                    if d.state == "running":
                        Deployments(s).cancel(d.id)
            assert list(pool.map(arrive, names)) == [None] * len(names)
            with db.session() as s:
                running = [d for d in Deployments(s).recent() if d.state == "running"]
                assert [d.noderange for d in running] == ["n[01-04]"]


def test_a_diskless_node_without_an_image_fails_with_the_reason(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    make_diskless("n01")
    with db.inventory() as inv:
        inv.update("profile", ["img"], {"image": None})
    with _service(home) as service, pytest.raises(DisklessError, match="has no image"):
        service.plan("n01", "good", "10.0.0.11")
    with db.session() as s:
        status = NodeStates(s).status("n01")
    assert status.state == "failed"
    assert status.message == "diskless boot: diskless node n01 has no image"


def test_the_last_node_done_ends_the_deployment_done(nodes: None, image: ImageVersion) -> None:
    ident = start("n[01-02]")
    with db.session() as s:
        store = Deployments(s)
        store.report(ident, "n01", Progress("done", 100, 100), "10.0.0.11")
        assert store.get(ident).state == "running"
        store.report(ident, "n02", Progress("done", 100, 100), "10.0.0.12")
        d = store.get(ident)
        assert d.state == "done" and d.finished


def test_a_report_that_only_moves_bytes_is_taken_in_memory_and_written_by_the_manager(
    home: Path, nodes: None, image: ImageVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    ident = start("n[01-02]")
    published: list[dict[str, Any]] = []
    with _service(home) as service, ThreadPoolExecutor(2) as pool:
        service.on_progress = published.append
        service.tick(pool)
        receiving = {"phase": "receiving", "bytes": 5, "total": 100}
        # the first report of a phase is checked and stored in full
        assert service.quick_progress(ident, "n01", "good", receiving, "10.0.0.11") is None
        service.progress(ident, "n01", "good", receiving, "10.0.0.11")
        more = receiving | {"bytes": 50}
        assert service.quick_progress(ident, "n01", "good", more, "10.0.0.11") == {
            "cancel": False,
            "phase": "receiving",
        }
        assert published[-1]["bytes"] == 50  # on the live views at once
        # not for another token, another address, another phase, or with a message
        for token, body, ip in (
            ("bad", more, "10.0.0.11"),
            ("good", more, "10.0.0.99"),
            ("good", more | {"phase": "configuring"}, "10.0.0.11"),
            ("good", more | {"message": "slow disk"}, "10.0.0.11"),
        ):
            assert service.quick_progress(ident, "n01", token, body, ip) is None
        with db.session() as s:
            assert Deployments(s).member(ident, "n01").bytes == 5  # not written yet
        service.tick(pool)
        with db.session() as s:
            assert Deployments(s).member(ident, "n01").bytes == 50
        # nor once its check is older than STEADY_TTL
        clock = Clock(monkeypatch)
        clock.now += 31
        assert service.quick_progress(ident, "n01", "good", more, "10.0.0.11") is None
        # a cancelled deployment is told at the next report, not hidden by the memory
        service.progress(ident, "n01", "good", more, "10.0.0.11")
        assert service.quick_progress(ident, "n01", "good", more, "10.0.0.11") is not None
        with db.session() as s:
            Deployments(s).cancel(ident)  # as the CLI would, in another process
        service.tick(pool)  # its write of n01's numbers finds the row cancelled
        assert service.quick_progress(ident, "n01", "good", more, "10.0.0.11") is None
        assert service.progress(ident, "n01", "good", more, "10.0.0.11")["cancel"] is True
