"""``corral deploy --transport chain`` on the virtual cluster: the server sends the image to
the first node only, each node relays it to the next (real agents, real TCP relays), and
every node ends with exactly the image's files; also under 1% loss, and with a node killed
in the middle of the chain while it receives (bypassed: the others end done).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.deploy.store import Deployments
from corral.images.exports import STREAM_INDEX
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.run import run
from corral.testbed import cluster
from tests.conftest import corral
from tests.integration.deploybed import (
    NODES,
    RANGE,
    add_image,
    check_nodes,
    deploy,
    node_root_digest,
    tree_digest,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]


def stream_size(version: ImageVersion) -> int:
    return int(json.loads((version.path / STREAM_INDEX).read_text())["size"])


def last_deployment() -> tuple[str, dict[str, tuple[str, int, int, str]]]:
    with db.session() as s:
        d = Deployments(s).recent()[0]
        return d.state, {n.node: (n.phase, n.bytes, n.total, n.message) for n in d.nodes}


def test_chain_sends_the_image_about_once_to_five_nodes(
    testbed: cluster.Testbed, tmp_path: Path
) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=21, random_mb=6)
    egress = testbed.server_egress_bytes()
    started = time.monotonic()
    result = deploy(home, "--transport", "chain", "--image", version.ref)
    seconds = time.monotonic() - started
    egress = testbed.server_egress_bytes() - egress
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NODES} done" in result.stdout
    check_nodes(testbed, version, tmp_path)
    state, rows = last_deployment()
    assert state == "done"
    assert all(b == t > 0 for _, b, t, _ in rows.values()), rows
    size = stream_size(version)
    print(f"chain, {NODES} nodes: egress {egress / size:.2f} x S (S = {size} B), {seconds:.1f} s")
    # plans, progress answers and the boot files are the rest; unicast would be 5 x S
    assert egress <= 2 * size, f"the server sent {egress} bytes for a {size}-byte stream"


def test_chain_under_one_percent_loss(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    state = testbed.require_state()
    ports = [info.port for info in state.nodes]
    lines = [line for port in ports for line in cluster.loss_filter(port, 0.01)]
    run(["tc", "-n", cluster.HUB, "-batch", "-"], input="\n".join(lines) + "\n")
    try:
        version = add_image(home, tmp_path, seed=22, random_mb=6)
        result = deploy(home, "--transport", "chain", "--image", version.ref)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{NODES} done" in result.stdout
        check_nodes(testbed, version, tmp_path)
    finally:
        for port in ports:
            run(["tc", "-n", cluster.HUB, "qdisc", "del", "dev", port, "clsact"], check=False)


def test_a_node_killed_mid_chain_fails_alone(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    state = testbed.require_state()
    before, victim, after = state.nodes[1], state.nodes[2], state.nodes[3]
    # slow downloads for tb002 and tb003 (and so for the nodes after them, which they
    # feed), so that tb003 is killed while receiving and tb002, which tb004 then pulls
    # from, still is; two chunks, so that nobody is passed for lagging (3 chunks) before
    slow = (before, victim)
    for info in slow:
        run(["ip", "netns", "exec", cluster.HUB, "tc", "qdisc", "change", "dev", info.port,
             "root", "tbf", "rate", "4mbit", "burst", "32k", "latency", "400ms"])  # fmt: skip
    try:
        version = add_image(home, tmp_path, seed=23, random_mb=6)
        result = corral("deploy", RANGE, "--image", version.ref, "--transport", "chain", home=home)
        assert result.returncode == 0, result.stderr
        ident = int(result.stdout.split()[1].rstrip(":"))

        def row(name: str) -> tuple[str, int, int, str]:
            with db.session() as s:
                r = Deployments(s).member(ident, name)
                return r.phase, r.bytes, r.total, r.message

        def halfway() -> bool:
            phase, done, total, _ = row(victim.name)
            return phase == "receiving" and 0 < done < total // 2 and row(after.name)[1] > 0

        _wait(halfway, 120, lambda: f"{victim.name} half way: {row(victim.name)}")
        testbed.power(victim.name, "off")
        _wait(lambda: row(victim.name)[0] == "failed", 60, f"{victim.name} reported failed")
        _wait(lambda: _state(ident) != "running", 120, "the deployment to end")
        with db.session() as s:
            rows = {n.node: n for n in Deployments(s).get(ident).nodes}
        assert "no report for" in rows[victim.name].message
        others = [info for info in state.nodes if info.name != victim.name]
        phases = {info.name: (rows[info.name].phase, rows[info.name].message) for info in others}
        assert all(phase == "done" for phase, _ in phases.values()), phases
        expected = tree_digest(version.rootfs)
        for info in others:
            assert node_root_digest(info.loop, tmp_path / f"mnt-{info.name}") == expected
        log = (testbed.nodes_dir / after.name / "agent.log").read_text()
        path = [line.split("chain: ", 1)[1] for line in log.splitlines() if "pulling from" in line]
        print(f"{after.name} after {victim.name} was killed: {path[-3:]}")
    finally:
        for info in slow:
            run(["ip", "netns", "exec", cluster.HUB, "tc", "qdisc", "replace", "dev", info.port,
                 "root", "tbf", "rate", "400mbit", "burst", "200k", "latency", "50ms"])  # fmt: skip


def _state(ident: int) -> str:
    with db.session() as s:
        return Deployments(s).get(ident).state


def _wait(check: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.3)
