"""``corral deploy`` end to end on the virtual cluster: corral serve in its namespace, the
real agent in each node's namespace writing a loop-device disk, over http and rsync.

Each deployment must leave every node's root filesystem holding exactly the image's files
(sha256, mode, symlink targets), apart from the identity files the agent writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.deploy.store import Deployments
from corral.images.catalog import image_store
from corral.inventory import db
from corral.run import pid_alive, run
from corral.testbed import cluster
from tests.conftest import corral
from tests.integration.deploybed import NODES, RANGE, add_image, check_nodes, deploy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]

#: A killed node is failed after 10 s of silence rather than 25: the promise is the same,
#: the wait shorter (the nodes here report every second), as in test_deploy_contract.py.
CORRAL_TOML = "deploy_node_timeout = 10.0\n"


def test_http_then_rsync_with_a_changed_image(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    v1 = add_image(home, tmp_path, seed=1)
    result = deploy(home, "--transport", "http")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NODES} done" in result.stdout
    check_nodes(testbed, v1, tmp_path)
    with db.session() as s:
        d = Deployments(s).recent()[0]
        assert d.state == "done"
        assert all(n.bytes == n.total > 0 for n in d.nodes)
    # the identity is the node's own
    info = testbed.require_state().nodes[0]

    # a new version with one file changed goes out by rsync: the layout is kept and only
    # the change travels
    tree2 = tmp_path / "tree2"
    subprocess.run(["cp", "-a", str(v1.rootfs), str(tree2)], check=True)
    (tree2 / "srv" / "data" / "f000.txt").write_text("changed in version 2\n")
    v2 = image_store(home).import_tree("small", tree2)
    egress = testbed.server_egress_bytes()
    result = deploy(home, "--transport", "rsync", "--image", v2.ref)
    assert result.returncode == 0, result.stdout + result.stderr
    check_nodes(testbed, v2, tmp_path)
    with db.session() as s:
        d = Deployments(s).recent()[0]
        assert d.state == "done" and d.transport == "rsync"
    egress = testbed.server_egress_bytes() - egress
    # five nodes, a 5 MB image: what went out is the change and rsync's file lists
    assert egress < v2.manifest["size_bytes"] // 2, f"rsync sent {egress} bytes to {NODES} nodes"
    mnt = tmp_path / "identity"
    mnt.mkdir()
    part = sorted(Path("/dev").glob(Path(info.loop).name + "p*"))[-1]
    run(["mount", "-o", "ro", str(part), str(mnt)])
    try:
        assert (mnt / "etc" / "hostname").read_text().strip() == info.name
        assert "ssh-ed25519 AAAAC3 t@x" in (mnt / "root" / ".ssh" / "authorized_keys").read_text()
        assert (mnt / "etc" / "ssh" / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
        assert "UUID=" in (mnt / "etc" / "fstab").read_text()
    finally:
        run(["umount", str(mnt)])


def test_bad_requests_are_refused_before_anything_is_written(testbed: cluster.Testbed) -> None:
    home = testbed.settings.home
    for args, words in [
        (["tb[001-009]"], "tb[006-009]"),
        ([RANGE, "--image", "nosuch"], "nosuch"),
        ([RANGE, "--transport", "pigeon"], "unknown transport"),
    ]:
        result = corral("deploy", *args, home=home)
        assert result.returncode == 2, result.stdout + result.stderr
        assert words in result.stderr
    with db.session() as s:
        before = len(Deployments(s).recent())
    assert corral("deployment", "list", home=home).returncode == 0
    with db.session() as s:
        assert len(Deployments(s).recent()) == before


def test_a_killed_node_fails_alone_and_a_server_restart_loses_nothing(
    testbed: cluster.Testbed, tmp_path: Path
) -> None:
    home = testbed.settings.home
    state = testbed.require_state()
    slow = state.nodes[-1]
    # tb005 gets a slow link so that it is still receiving when it is killed
    run(["ip", "netns", "exec", "ctb-hub", "tc", "qdisc", "change", "dev", slow.port, "root",
         "tbf", "rate", "512kbit", "burst", "32k", "latency", "400ms"])  # fmt: skip
    try:
        v = add_image(home, tmp_path, seed=3, random_mb=4)
        result = corral("deploy", RANGE, "--image", v.ref, home=home)
        assert result.returncode == 0, result.stderr
        ident = int(result.stdout.split()[1].rstrip(":"))
        phase = lambda n: _phase(ident, n)  # noqa: E731
        _wait(lambda: phase(slow.name) == "receiving", 120, "tb005 receiving")
        # corral serve restarts while tb005 receives
        pid = testbed.require_state().server_pid
        assert pid
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not pid_alive(pid), 30, "corral serve to stop")
        testbed.start_server()
        _wait(
            lambda: phase(slow.name) == "receiving" and _bytes(ident, slow.name) > 0,
            60,
            lambda: f"tb005 receiving after the restart: {_row(ident, slow.name)}",
        )
        killed = time.monotonic()
        testbed.power(slow.name, "off")
        _wait(lambda: phase(slow.name) == "failed", 60, "tb005 reported failed")
        assert time.monotonic() - killed <= 45  # the 10 s timeout, and a busy host's ticks
        _wait(lambda: _state(ident) != "running", 120, "the deployment to end")
        with db.session() as s:
            rows = {n.node: n for n in Deployments(s).get(ident).nodes}
        assert "no report for" in rows[slow.name].message
        others = {n.name: (rows[n.name].phase, rows[n.name].message) for n in state.nodes[:-1]}
        assert all(p == "done" for p, _ in others.values()), others
    finally:
        run(["ip", "netns", "exec", "ctb-hub", "tc", "qdisc", "replace", "dev", slow.port,
             "root", "tbf", "rate", "400mbit", "burst", "200k", "latency", "50ms"])  # fmt: skip


def _phase(ident: int, node: str) -> str:
    with db.session() as s:
        return Deployments(s).member(ident, node).phase


def _row(ident: int, node: str) -> tuple[str, int, str]:
    with db.session() as s:
        row = Deployments(s).member(ident, node)
        return row.phase, row.bytes, row.message


def _bytes(ident: int, node: str) -> int:
    with db.session() as s:
        return Deployments(s).member(ident, node).bytes


def _state(ident: int) -> str:
    with db.session() as s:
        return Deployments(s).get(ident).state


def _wait(check: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.5)
