"""``corral deploy --transport multicast`` on the virtual cluster: real udp-sender in corral
serve's namespace, real udp-receiver in each node's, the real agent unpacking onto its
loop-device disk.

Every node must end with exactly the image's files; the image crosses the server's link
about once (not once per node); under 1 % loss it still arrives whole; and a node whose
udp-receiver dies mid-transfer finishes by HTTP from the chunk it lacked while the others
finish by multicast alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.deploy.store import Deployments
from corral.inventory import db
from corral.run import run
from corral.testbed import cluster
from corral.testbed.netns import namespace_pid_map
from tests.conftest import corral
from tests.integration.deploybed import (
    NODES,
    RANGE,
    add_image,
    check_nodes,
    deploy_everywhere,
    stream_size,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]

RECEIVED = re.compile(
    r"received (\S+): (\d+) bytes in (\d+) chunks, (\d+) by multicast, (\d+) by HTTP"
)


def received(bed: cluster.Testbed, node: str, ref: str) -> tuple[int, int]:
    """(chunks by multicast, chunks by HTTP) of the node's last install of ``ref``."""
    text = (bed.nodes_dir / node / "console.log").read_text(errors="replace")
    found = [m for m in RECEIVED.finditer(text) if m.group(1) == ref]
    assert found, f"{node}: no 'received {ref}' line in its console log"
    return int(found[-1].group(4)), int(found[-1].group(5))


def last_deployment() -> tuple[str, dict[str, tuple[str, str]]]:
    with db.session() as s:
        d = Deployments(s).recent()[0]
        return d.state, {n.node: (n.phase, n.message) for n in d.nodes}


def test_five_nodes_by_multicast(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=11, random_mb=6)
    egress = deploy_everywhere(testbed, version, tmp_path, "--transport", "multicast")
    size = stream_size(version)
    for info in testbed.require_state().nodes:
        by_multicast, by_http = received(testbed, info.name, version.ref)
        assert by_multicast > 0 and by_http == 0, f"{info.name} fell back to HTTP"
    # unicast would send NODES x S; udpcast sends S plus headers and FEC (~6 %)
    print(f"multicast, {NODES} nodes: egress {egress / size:.2f} x S (S = {size} bytes)")
    assert egress <= 2 * size, f"{egress} bytes left the server for a {size}-byte stream"


@pytest.fixture
def loss(testbed: cluster.Testbed) -> Iterator[float]:
    """1 % of the packets toward every node dropped, as ``corral testbed up --loss``."""
    ports = [info.port for info in testbed.require_state().nodes]
    lines = [line for port in ports for line in cluster.loss_filter(port, 0.01)]
    run(["tc", "-n", cluster.HUB, "-batch", "-"], input="\n".join(lines) + "\n")
    try:
        yield 0.01
    finally:
        for port in ports:
            run(["tc", "-n", cluster.HUB, "qdisc", "del", "dev", port, "clsact"], check=False)


def test_multicast_under_one_percent_loss(
    testbed: cluster.Testbed, tmp_path: Path, loss: float
) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=12, random_mb=6)
    egress = deploy_everywhere(testbed, version, tmp_path, "--transport", "multicast")
    size = stream_size(version)
    chunks = [received(testbed, info.name, version.ref) for info in testbed.require_state().nodes]
    print(f"multicast, {NODES} nodes, 1 % loss: egress {egress / size:.2f} x S, chunks {chunks}")
    assert egress <= 2 * size


def test_a_node_whose_receiver_dies_catches_up_by_http(
    testbed: cluster.Testbed, tmp_path: Path
) -> None:
    home = testbed.settings.home
    nodes = testbed.require_state().nodes
    victim = nodes[-1]
    # about 14 MiB: several seconds at the session's rate, time to kill it mid-transfer
    version = add_image(home, tmp_path, seed=13, random_mb=12)
    result = corral("deploy", RANGE, "--image", version.ref, "--transport", "multicast", home=home)
    assert result.returncode == 0, result.stderr
    ident = int(result.stdout.split()[1].rstrip(":"))
    size = stream_size(version)

    def progress() -> tuple[str, int]:
        with db.session() as s:
            row = Deployments(s).member(ident, victim.name)
            return row.phase, row.bytes

    _wait(lambda: progress()[1] > 0, 180, "the victim receiving its first bytes")
    phase, got = progress()
    assert phase == "receiving" and got < size, f"too late to kill: {phase} at {got} of {size}"
    killed = _kill_udp_receiver(victim.namespace)
    assert killed, f"no udp-receiver running in {victim.namespace}"
    _wait(lambda: last_deployment()[0] != "running", 180, "the deployment to end")
    state, rows = last_deployment()
    assert state == "done", rows
    assert all(phase == "done" for phase, _ in rows.values()), rows
    check_nodes(testbed, version, tmp_path)
    by_multicast, by_http = received(testbed, victim.name, version.ref)
    assert by_http >= 1, "the victim should have finished by HTTP"
    for info in nodes[:-1]:
        assert received(testbed, info.name, version.ref)[1] == 0, f"{info.name} used HTTP"
    console = (testbed.nodes_dir / victim.name / "console.log").read_text(errors="replace")
    assert f"by HTTP from chunk {by_multicast} of {by_multicast + by_http}" in console


def test_a_node_that_missed_its_connect_reply_is_waited_for(
    testbed: cluster.Testbed, tmp_path: Path
) -> None:
    """udp-sender counts a receiver when its connect request arrives; the node learns it
    is in from the reply. Here every UDP packet from the server to the victim (its
    replies; the hellos and the data go to groups) is dropped until udp-sender has
    counted every node, and for a while after: udp-sender alone starts as soon as its
    count is full, and the victim, left out, took the whole image over HTTP (it did, one
    or two nodes a run, at N = 100 with 1 % loss). corral starts the transfer when the
    nodes said they joined, so the victim, let in at the next hello, is in the session."""
    home = testbed.settings.home
    state = testbed.require_state()
    victim = state.nodes[-1]
    version = add_image(home, tmp_path, seed=14, random_mb=4)
    tc = ["tc", "-n", cluster.HUB]
    run([*tc, "qdisc", "add", "dev", victim.port, "clsact"])
    try:
        program = _udp_drop_program(state.server_ip, victim.ip)
        run([*tc, "filter", "add", "dev", victim.port, "egress", "bpf", "da", "bytecode", program])
        result = corral(
            "deploy", RANGE, "--image", version.ref, "--transport", "multicast", home=home
        )
        assert result.returncode == 0, result.stderr
        ident = int(result.stdout.split()[1].rstrip(":"))
        sender_log = home / "multicast" / f"d{ident}-{version.name}-{version.version}.log"

        def said() -> str:
            return sender_log.read_text(errors="replace") if sender_log.exists() else ""

        _wait(lambda: said().count("New connection") >= NODES, 180, "udp-sender to count all")
        time.sleep(1.5)  # udp-sender starts within 0.2 s of a full count on its own
        assert "Starting transfer" not in said(), "the transfer started without the victim"
    finally:
        run([*tc, "qdisc", "del", "dev", victim.port, "clsact"], check=False)
    _wait(lambda: last_deployment()[0] != "running", 180, "the deployment to end")
    state_, rows = last_deployment()
    assert state_ == "done", rows
    check_nodes(testbed, version, tmp_path)
    for info in state.nodes:
        assert received(testbed, info.name, version.ref)[1] == 0, f"{info.name} used HTTP"
    assert "Dropping client" not in said()


def _udp_drop_program(source: str, destination: str) -> str:
    """Classic BPF for a clsact hook in direct-action mode (the kernel here has no tc
    action modules): drop IPv4 UDP from ``source`` to ``destination``, pass the rest."""

    def word(address: str) -> int:
        return int(ipaddress.IPv4Address(address))

    code = [
        (0x28, 0, 0, 12),  # ldh [12]: the ethertype
        (0x15, 0, 7, 0x0800),  # IPv4, else pass
        (0x30, 0, 0, 23),  # ldb [23]: the IP protocol
        (0x15, 0, 5, 17),  # UDP, else pass
        (0x20, 0, 0, 26),  # ld [26]: the source address
        (0x15, 0, 3, word(source)),
        (0x20, 0, 0, 30),  # ld [30]: the destination address
        (0x15, 0, 1, word(destination)),
        (0x06, 0, 0, 2),  # TC_ACT_SHOT
        (0x06, 0, 0, 0),  # TC_ACT_OK
    ]
    return ",".join([str(len(code)), *(f"{c} {t} {f} {k}" for c, t, f, k in code)])


def _kill_udp_receiver(namespace: str) -> list[int]:
    killed = []
    for pid in namespace_pid_map(namespace).get(namespace, []):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "udp-receiver":
            os.kill(pid, 9)
            killed.append(pid)
    return killed


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
