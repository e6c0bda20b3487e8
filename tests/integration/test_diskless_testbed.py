"""Diskless boots on the virtual cluster, as far as the real agent goes in a network
namespace: real corral serve, real transports, real agents that fetch the image's squashfs
chunk by chunk into a tmpfs, mount it read-only under a tmpfs overlay (in a mount
namespace of their own), write the node's identity and report; only the image's init is
not started (the VM tests do that, tests/vm/test_diskless.py).

- ``corral boot`` makes the squashfs export, power-cycles the nodes and sends it to them
  in one session (multicast and chain: about one copy from the server);
- nodes that boot on their own are gathered into one deployment per image version;
- a node whose known RAM cannot hold the image is refused at the command, with figures.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from corral.deploy.store import Deployments
from corral.images.catalog import image_store
from corral.images.exports import Chunked
from corral.inventory import db
from corral.inventory import models as m
from corral.inventory.state import NodeStates
from corral.testbed import cluster
from tests.conftest import corral
from tests.integration.deploybed import NODES, RANGE, add_image, shape

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]

CORRAL_TOML = "diskless_window = 8.0\n"


@pytest.fixture(scope="module")
def bed(testbed: cluster.Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = testbed.settings.home
    add_image(home, tmp_path_factory.mktemp("img"), seed=7, random_mb=6)
    changed = corral("node", "set", RANGE, "--install-method", "diskless", home=home)
    assert changed.returncode == 0, changed.stderr
    # `corral boot` makes the squashfs when it lacks; a node booting on its own needs it made
    exported = corral("image", "export", "small:1", home=home)
    assert exported.returncode == 0, exported.stderr
    testbed.start_server()
    yield home


def agent_log(testbed: cluster.Testbed, node: str) -> str:
    path = testbed.nodes_dir / node / "agent.log"
    return path.read_text() if path.exists() else ""


def check_booted(testbed: cluster.Testbed, ident: int, transport: str) -> None:
    with db.session() as s:
        row = Deployments(s).get(ident)
        assert row.kind == "diskless"
        phases = {n.node: (n.phase, n.transport, n.message) for n in row.nodes}
        statuses = {st.name: st for st in NodeStates(s).statuses(sorted(phases))}
    assert len(phases) == NODES
    for node, (phase, used, message) in phases.items():
        log = agent_log(testbed, node)
        assert phase == "done", f"{node}: {phase} {message}\n{log[-3000:]}"
        assert used == transport
        assert "in RAM" in message
        assert re.search(r"root: .*image\.squashfs read-only under a 25% tmpfs overlay", log)
        assert f"identity of {node} written: etc/hostname" in log
        assert "etc/machine-id" in log
        assert statuses[node].state == "booting" and statuses[node].phase == "starting"


@pytest.mark.parametrize("transport", ["multicast", "chain"])
def test_corral_boot_sends_the_squashfs_once_to_every_node(
    testbed: cluster.Testbed, bed: Path, transport: str
) -> None:
    shape(testbed, "50mbit")
    before = testbed.server_egress_bytes()
    booted = corral("boot", RANGE, "--transport", transport, "--no-wait", home=bed)
    assert booted.returncode == 0, booted.stderr
    ident = int(re.search(r"boot (\d+):", booted.stdout).group(1))  # type: ignore[union-attr]
    deadline = time.monotonic() + 240
    with db.session() as s:
        image = Deployments(s).get(ident).nodes[0].image
    while True:
        with db.session() as s:
            state = Deployments(s).get(ident).state
        if state != "running" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state == "done", f"deployment {ident}: {state}"
    check_booted(testbed, ident, transport)
    size = Chunked(image_store(bed).get_ref(image), "squashfs").index()["size"]
    egress = testbed.server_egress_bytes() - before
    assert egress < 2.5 * size, f"{egress} bytes out for {NODES} x {size}"


def set_memory(node: str, memory_mb: int | None) -> None:
    """What discovery would have found of the node's RAM."""
    with db.session() as s:
        NodeStates(s).status(node)  # the row exists
        node_id = s.scalar(select(m.Node.id).where(m.Node.name == node))
        row = s.get(m.NodeState, node_id)
        assert row is not None
        row.facts = {"memory_mb": memory_mb} if memory_mb else None


def test_nodes_booting_on_their_own_share_one_session(testbed: cluster.Testbed, bed: Path) -> None:
    with db.session() as s:
        before = {d.id for d in Deployments(s).recent()}
    # all off first: powering a running node off waits for its processes, and five such
    # waits in a row could outlast the gathering window between the first node and the last
    for node in testbed.node_names:
        testbed.power(node, "off")
    for node in testbed.node_names:
        testbed.power(node, "on")
    deadline = time.monotonic() + 240
    while True:
        with db.session() as s:
            new = [d for d in Deployments(s).recent() if d.id not in before]
            joined = {n.node for d in new for n in d.nodes}
            ended = new and all(d.state != "running" for d in new)
        if (ended and joined == set(testbed.node_names)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    # more than one: a node came up after the first one's gathering window closed
    assert len(new) == 1, [(d.id, d.noderange, d.state) for d in new]
    assert new[0].noderange == RANGE and new[0].kind == "diskless"
    check_booted(testbed, new[0].id, new[0].nodes[0].transport)


def test_a_node_too_small_for_the_image_is_refused_with_figures(
    testbed: cluster.Testbed, bed: Path
) -> None:
    set_memory("tb001", 256)
    try:
        refused = corral("boot", "tb001", "--no-wait", home=bed)
        assert refused.returncode == 2
        assert "tb001: 256 MiB of RAM cannot hold the image's squashfs" in refused.stderr
        assert "MiB needed" in refused.stderr
        with db.session() as s:
            assert not Deployments(s).active_nodes(["tb001"])  # nothing stored
    finally:
        set_memory("tb001", None)
