"""The HTTP face of `corral serve`: boot files live from the inventory, node reports,
tokens, netboot-once, discovery and the admin API (through Starlette's test client)."""

from __future__ import annotations

import gzip
import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.http import create_app

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def service(fixture_cluster: None, settings: Settings) -> BootService:
    return BootService(settings, db.engine())


@pytest.fixture
def node(service: BootService) -> Iterator[TestClient]:
    """A client at c01's reserved address."""
    with TestClient(create_app(service, "admin-secret"), client=("10.0.0.11", 40000)) as c:
        yield c


@pytest.fixture
def stranger(service: BootService) -> Iterator[TestClient]:
    with TestClient(create_app(service, "admin-secret"), client=("10.0.0.99", 40000)) as c:
        yield c


def kickstart_token(node: TestClient) -> str:
    response = node.get("/ks/c01")
    assert response.status_code == 200, response.text
    match = re.search(r"^CORRAL_TOKEN=(\S+)$", response.text, re.M)
    assert match
    return match.group(1)


def test_ipxe_script_is_rendered_live_for_a_mac(node: TestClient) -> None:
    entry = node.get("/boot/ipxe")
    assert "chain http://10.0.0.1:8080/boot/${net0/mac:hexhyp}.ipxe" in entry.text
    script = node.get("/boot/52-54-00-00-00-01.ipxe")
    assert script.status_code == 200
    assert script.text.startswith("#!ipxe\n")
    assert "inst.ks=http://10.0.0.1:8080/ks/c01" in script.text
    # No secret on the kernel command line.
    assert "token" not in script.text.lower()
    with db.inventory() as inv:
        inv.update("node", ["c01"], {"variables": {"row": "r1"}, "install_method": "image"})
    image = node.get("/boot/52:54:00:00:00:01.ipxe")
    assert "corral.node=c01" in image.text
    assert "initrd --name token.cpio.gz http://10.0.0.1:8080/boot/token/c01.cpio.gz" in image.text


def test_unknown_mac_gets_discovery_and_registers(node: TestClient) -> None:
    script = node.get("/boot/52-54-00-00-aa-01.ipxe")
    assert "corral.discover=1" in script.text
    facts = {
        "mac": "52:54:00:00:aa:01",
        "cpus": 4,
        "memory_mb": 2048,
        "disks": [{"name": "vda", "bytes": 10**10}],
        "nics": [{"name": "eth0"}],
    }
    answer = node.post("/api/v1/discover", json=facts)
    assert answer.json() == {"node": "d52540000aa01"}
    status = node.get("/api/v1/nodes/d52540000aa01/status", headers=ADMIN).json()
    assert status["state"] == "discovered"
    # Known now: no discovery, and no install until adopted and armed.
    assert "local disk" in node.get("/boot/52-54-00-00-aa-01.ipxe").text


def test_kickstart_only_to_the_nodes_own_address(
    node: TestClient, stranger: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "corral.serve"):
        assert stranger.get("/ks/c01").status_code == 403
    assert "refused kickstart of node c01 to 10.0.0.99" in caplog.text
    assert node.get("/ks/nosuch").status_code == 404


def test_tokens_guard_callbacks(node: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    token = kickstart_token(node)
    with caplog.at_level(logging.WARNING, "corral.serve"):
        assert node.post("/api/v1/nodes/c01/events", json={"phase": "booted"}).status_code == 403
        wrong = {"Authorization": "Bearer " + "x" * len(token)}
        assert (
            node.post(
                "/api/v1/nodes/c01/events", json={"phase": "booted"}, headers=wrong
            ).status_code
            == 403
        )
    assert "refused request for node c01 from 10.0.0.11: missing token" in caplog.text
    assert "wrong token" in caplog.text
    ok = node.post(f"/api/v1/nodes/c01/events?token={token}", json={"phase": "pre-install"})
    assert ok.json() == {"node": "c01", "state": "installing", "phase": "pre-install"}
    # A token works for its own node only.
    assert (
        node.post(
            "/api/v1/nodes/bonded/events",
            json={"phase": "booted"},
            headers={"Authorization": f"Bearer {token}"},
        ).status_code
        == 403
    )
    # A new kickstart fetch issues a new token: the old one stops working.
    kickstart_token(node)
    assert (
        node.post(f"/api/v1/nodes/c01/events?token={token}", json={"phase": "booted"}).status_code
        == 403
    )


def test_netboot_once_until_reinstall(node: TestClient) -> None:
    token = kickstart_token(node)
    done = node.post(
        "/api/v1/nodes/c01/events",
        json={"phase": "install-finished"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert done.json()["state"] == "installed"
    script = node.get("/boot/52-54-00-00-00-01.ipxe").text
    assert "boots from its local disk" in script and "\nexit 1\n" in script
    assert node.get("/ks/c01").status_code == 403
    assert node.post("/api/v1/nodes/c01/reinstall").status_code == 401
    assert node.post("/api/v1/nodes/c01/reinstall", headers=ADMIN).json()["state"] == "armed"
    assert "inst.ks=" in node.get("/boot/52-54-00-00-00-01.ipxe").text


def test_failed_install_does_not_loop(node: TestClient) -> None:
    token = kickstart_token(node)
    node.post(
        "/api/v1/nodes/c01/events",
        json={"phase": "failed", "message": "disk"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert "local disk" in node.get("/boot/52-54-00-00-00-01.ipxe").text


def test_token_cpio_is_an_initrd_with_the_token(node: TestClient, tmp_path: Path) -> None:
    with db.inventory() as inv:
        inv.update("node", ["c01"], {"install_method": "image"})
    archive = node.get("/boot/token/c01.cpio.gz")
    assert archive.status_code == 200
    (tmp_path / "t.cpio").write_bytes(gzip.decompress(archive.content))
    listing = subprocess.run(
        ["cpio", "-itv", "-F", str(tmp_path / "t.cpio")], capture_output=True, text=True, check=True
    ).stdout
    assert "etc/corral/node-token" in listing and "-rw-------" in listing
    subprocess.run(
        ["cpio", "-idm", "-F", str(tmp_path / "t.cpio")],
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    token = (tmp_path / "etc/corral/node-token").read_text().strip()
    ok = node.post(
        "/api/v1/nodes/c01/events",
        json={"phase": "booted"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert ok.status_code == 200


def test_scripts_need_the_token(node: TestClient) -> None:
    token = kickstart_token(node)
    assert node.get("/scripts/c01/post").status_code == 403
    post = node.get(f"/scripts/c01/post?token={token}")
    assert post.status_code == 200 and post.text.startswith("#!/bin/bash")
    assert f"CORRAL_TOKEN={token}" in post.text


def test_kernel_and_ramdisk_files_support_range(
    node: TestClient, settings: Settings, tmp_path: Path
) -> None:
    settings.ramdisk.mkdir(parents=True)
    data = bytes(range(256)) * 4096
    (settings.ramdisk / "initrd.img").write_bytes(gzip.compress(data))
    whole = node.get("/corral/ramdisk/initrd.img").content
    part = node.get("/corral/ramdisk/initrd.img", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert node.get("/corral/ramdisk/other").status_code == 404
    assert node.get("/distros/rhel9/vmlinuz").status_code == 404  # an URL, not a local file


def test_admin_api_crud_and_openapi(node: TestClient) -> None:
    assert node.get("/api/v1/nodes").status_code == 401
    assert node.get("/api/v1/nodes", headers={"Authorization": "Bearer nope"}).status_code == 401
    names = [n["name"] for n in node.get("/api/v1/nodes", headers=ADMIN).json()]
    assert "c01" in names
    new = {
        "name": "api1",
        "interfaces": [{"mac": "52:54:00:00:0a:01", "ip": "10.0.0.201"}],
        "groups": ["compute"],
    }
    assert node.post("/api/v1/nodes", json=new, headers=ADMIN).status_code == 201
    dup = dict(new, name="api2")
    conflict = node.post("/api/v1/nodes", json=dup, headers=ADMIN)
    assert conflict.status_code == 409 and "belongs to node api1" in conflict.json()["detail"]
    bad = node.post(
        "/api/v1/nodes", json={"name": "x", "interfaces": [{"mac": "zz"}]}, headers=ADMIN
    )
    assert bad.status_code == 422
    patched = node.patch("/api/v1/nodes/api1", json={"netboot": False}, headers=ADMIN)
    assert patched.json()["netboot"] is False
    assert node.delete("/api/v1/nodes/api1", headers=ADMIN).status_code == 204
    assert node.get("/api/v1/nodes/api1", headers=ADMIN).status_code == 404
    schema = node.get("/openapi.json").json()
    assert {
        "/api/v1/nodes",
        "/api/v1/profiles",
        "/api/v1/distros",
        "/api/v1/groups",
        "/boot/{mac}.ipxe",
        "/api/v1/nodes/{name}/events",
    } <= set(schema["paths"])


def test_tftp_faces(service: BootService) -> None:
    """What the TFTP server hands out, rendered live like the HTTP files."""
    # fed01's distro has a local kernel, served under distros/; c01's (rhel9) is a URL,
    # which GRUB fetches itself and pxelinux cannot (its menu says so).
    menu = service.tftp_resolve("pxelinux.cfg/01-52-54-00-00-00-04", "10.0.0.14")
    assert menu is not None and b"APPEND inst.ks=http://10.0.0.1:8080/ks/fed01" in menu
    assert b"KERNEL distros/fedora40/vmlinuz" in menu
    menu = service.tftp_resolve("pxelinux.cfg/01-52-54-00-00-00-01", "10.0.0.11")
    assert menu is not None and b"c01 cannot boot with pxelinux" in menu
    grub = service.tftp_resolve("grub/grub.cfg-01-52-54-00-00-00-01", "10.0.0.11")
    assert grub is not None
    assert b"linux (http,mirror.example)/rhel9/images/pxeboot/vmlinuz inst.ks=" in grub
    assert service.tftp_resolve("pxelinux.cfg/01-52-54-00-00-00-ee", "10.0.0.11") is None
    default = service.tftp_resolve("pxelinux.cfg/default", "10.0.0.11")
    assert default is not None and b"LOCALBOOT 0" in default
    assert service.tftp_resolve("undionly.kpxe", "10.0.0.11") is None  # a static file


def events(client: TestClient, node: str) -> list[tuple[str, str, str]]:
    """The node's stored events through the API: (phase, message, source)."""
    answer = client.get(f"/api/v1/events?node={node}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return [(e["phase"], e["message"], e["source"]) for e in answer.json()]


def test_boot_fetches_are_recorded_as_the_nodes_boot_steps(
    node: TestClient, stranger: TestClient, settings: Settings
) -> None:
    with db.inventory() as inv:
        inv.update("node", ["c01"], {"install_method": "image"})
    assert node.get("/corral/ramdisk/vmlinuz").status_code == 404  # not built yet
    settings.ramdisk.mkdir(parents=True)
    (settings.ramdisk / "vmlinuz").write_bytes(b"kernel")
    (settings.ramdisk / "initrd.img").write_bytes(b"initrd")
    for path in (
        "/boot/ipxe",
        "/boot/52-54-00-00-00-01.ipxe",
        "/corral/ramdisk/vmlinuz",
        "/corral/ramdisk/initrd.img",
        "/boot/token/c01.cpio.gz",
    ):
        assert node.get(path).status_code == 200, path
    assert stranger.get("/boot/token/c01.cpio.gz").status_code == 403
    client = "10.0.0.11"
    assert events(node, "c01") == [
        (
            "kernel",
            "vmlinuz over HTTP failed: no ramdisk file vmlinuz: run 'corral ramdisk build'",
            client,
        ),
        ("boot-config", "iPXE entry script over HTTP", client),
        ("boot-config", "iPXE script over HTTP", client),
        ("kernel", "vmlinuz over HTTP", client),
        ("initrd", "initrd.img over HTTP", client),
        ("initrd", "token over HTTP", client),
    ]
    status = node.get("/api/v1/nodes/c01/status", headers=ADMIN).json()
    assert (status["state"], status["phase"]) == ("armed", "initrd")
    # the stranger's refused token is its own (unknown machine's) step, not c01's
    unknown = node.get("/api/v1/events", headers=ADMIN).json()
    assert [(e["node"], e["phase"], e["source"]) for e in unknown if e["node"] is None] == [
        (None, "initrd", "10.0.0.99")
    ]
    assert "token of node c01 is served only to its own address" in unknown[-1]["message"]


def test_an_unknown_machines_fetches_carry_its_mac(node: TestClient) -> None:
    assert node.get("/boot/52-54-00-00-aa-07.ipxe").status_code == 200
    unknown = [e for e in node.get("/api/v1/events", headers=ADMIN).json() if e["node"] is None]
    assert [(e["mac"], e["phase"], e["message"]) for e in unknown] == [
        ("52:54:00:00:aa:07", "boot-config", "iPXE script over HTTP")
    ]


def test_kickstart_fetch_is_a_boot_config_step(node: TestClient) -> None:
    kickstart_token(node)
    assert events(node, "c01")[-1] == ("boot-config", "kickstart over HTTP", "10.0.0.11")


def test_a_bad_event_is_refused_logged_and_not_stored(
    node: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = kickstart_token(node)
    with db.session() as s:
        before = len(NodeStates(s).events("c01"))
    auth = {"Authorization": f"Bearer {token}"}
    unknown = node.post("/api/v1/nodes/c01/events", json={"phase": "bogus"}, headers=auth)
    assert unknown.status_code == 422
    assert "does not report phase 'bogus'" in unknown.json()["detail"]
    malformed = node.post("/api/v1/nodes/c01/events", json={"message": 3}, headers=auth)
    assert malformed.status_code == 422
    with db.session() as s:
        assert len(NodeStates(s).events("c01")) == before
    assert "refused POST /api/v1/nodes/c01/events from 10.0.0.11: a node does not" in caplog.text
    assert "refused POST /api/v1/nodes/c01/events from 10.0.0.11: malformed (body" in caplog.text
