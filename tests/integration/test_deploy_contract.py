"""The transports' contract on the virtual cluster: ``corral deploy`` with each transport
the server registers, real corral serve, real agents, real loop-device disks; the same
promises as the unit suite (tests/unit/test_transport_contract.py), on real parts:

- every file is on every disk: the five nodes end with exactly the image's files; and a
  transport with sessions (all but the unicast ones) sends the image about once;
- a bad chunk is fetched again: one chunk file is spoiled on corral's disk for exactly one
  read after corral checked it, the read that sends it to the nodes by the transport
  (:class:`Spoiler`); the nodes that got it say it did not match its sha256, and end
  with every file;
- a killed peer is bypassed: a node powered off half way fails alone, the nodes that
  were taking from it end done with every file (transports whose nodes take from each
  other);
- cancel stops it: ``corral deployment cancel`` half way ends every node's processes and
  every transfer of the session on corral's side.

What a transport does beyond them (its loss tolerance, its way back to HTTP, rsync's
increments) is tested in its own module: test_deploy.py, test_deploy_chain.py,
test_deploy_multicast.py, test_deploy_bittorrent.py.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import select
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.deploy import transports
from corral.deploy.store import Deployments
from corral.deploy.transports.base import Unicast
from corral.images.exports import STREAM_INDEX
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.testbed import cluster
from corral.testbed.netns import namespace_pid_map
from tests.conftest import corral
from tests.integration.deploybed import (
    LINK,
    NODES,
    RANGE,
    add_image,
    check_nodes,
    deploy,
    node_root_digest,
    shape,
    tree_digest,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]

#: A killed node is failed after 10 s of silence rather than 25: the promise is the same,
#: the wait shorter (the nodes here report every second).
CORRAL_TOML = "deploy_node_timeout = 10.0\n"
#: The nodes' links while an image goes out whole: slow enough that the transfer lasts a
#: few seconds, so that BitTorrent's nodes have time to swap pieces.
WHOLE_LINK = "50mbit"
#: ... and while one is killed or the deployment cancelled half way: slower still, so that
#: every node is half way at once.
HALF_LINK = "16mbit"
#: Slower still for the cancel test, which must find all the nodes mid-stream at one poll:
#: at HALF_LINK a chain's first node could be done before its last one had begun.
CANCEL_LINK = "6mbit"
#: Transports with no single read of a chunk file to spoil, and why.
NO_SPOILING = {
    "rsync": (
        "rsync sends the image's tree, not the chunked stream: there is no chunk to spoil "
        "(rsync checks each file it writes against its own whole-file checksum)"
    ),
    "bittorrent": (
        "libtorrent's seed keeps the chunk files open (its file pool) and reads pieces of "
        "them as peers ask, so there is no one read to spoil; and libtorrent checks each "
        "piece against the torrent's SHA-1 before corral's sha256 sees it (the fake swarm of "
        "tests/unit/test_transport_contract.py hands corral a bad chunk)"
    ),
}
#: Transports whose nodes take nothing from each other, and why that is.
NO_PEERS = {
    "http": "every node takes the image from corral alone: there is no peer to kill",
    "rsync": "every node takes the image from corral alone: there is no peer to kill",
    "multicast": (
        "the nodes take nothing from each other; udp-sender going on without a receiver "
        "that died is test_deploy_multicast.py::test_a_node_whose_receiver_dies_catches_up_by_http"
    ),
}


@pytest.fixture(params=transports.names())
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def links(testbed: cluster.Testbed) -> Iterator[Callable[[str], None]]:
    """Shape every node's link; they are back at the testbed's rate after the test."""
    try:
        yield lambda rate: shape(testbed, rate)
    finally:
        shape(testbed, LINK)


def stream_size(version: ImageVersion) -> int:
    return int(json.loads((version.path / STREAM_INDEX).read_text())["size"])


def start(home: Path, version: ImageVersion, transport: str) -> int:
    """``corral deploy`` without waiting; the deployment's id."""
    result = corral("deploy", RANGE, "--image", version.ref, "--transport", transport, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.split()[1].rstrip(":"))


def rows(ident: int) -> dict[str, tuple[str, int, int, str]]:
    """node -> (phase, bytes, total, message) in deployment ``ident``."""
    with db.session() as s:
        return {
            n.node: (n.phase, n.bytes, n.total, n.message) for n in Deployments(s).get(ident).nodes
        }


def state(ident: int) -> str:
    with db.session() as s:
        return Deployments(s).get(ident).state


def wait(check: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.3)


def half_way(ident: int, nodes: list[str]) -> Callable[[], bool]:
    """Whether each of ``nodes`` is receiving and has some of the image, not half of it."""

    def check() -> bool:
        now = rows(ident)
        return all(now[n][0] == "receiving" and 0 < now[n][1] < now[n][2] // 2 for n in nodes)

    return check


def test_every_file_is_on_every_disk(
    testbed: cluster.Testbed, tmp_path: Path, transport: str, links: Callable[[str], None]
) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=31, random_mb=12)
    links(WHOLE_LINK)
    egress = testbed.server_egress_bytes()
    result = deploy(home, "--transport", transport, "--image", version.ref)
    egress = testbed.server_egress_bytes() - egress
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NODES} done" in result.stdout
    check_nodes(testbed, version, tmp_path)
    size = stream_size(version)
    server_side = transports.REGISTRY[transport]
    with db.session() as s:
        d = Deployments(s).recent()[0]
        assert d.state == "done" and d.transport == transport
        if getattr(server_side, "export", "") == "stream":
            # rsync counts what it sent of the tree, not the tree's bytes
            assert all(n.bytes == n.total == size for n in d.nodes)
    print(f"{transport}, {NODES} nodes: server egress {egress / size:.2f} x S (S = {size} B)")
    if not (isinstance(server_side, type) and issubclass(server_side, Unicast)):
        # unicast sends a copy per node; a session's nodes share one (measured: chain,
        # multicast 1.0-1.1 x S, bittorrent 1.02-1.29 x S)
        assert egress <= 2 * size, f"{egress} bytes left the server for a {size}-byte stream"


class Spoiler:
    """Chunk file ``path`` with one byte changed for the next read that ends (inotify's
    IN_CLOSE_NOWRITE), then as it was; a read that began before :meth:`spoil` is not
    waited for (none may: the test spoils before any node receives)."""

    IN_CLOSE_NOWRITE = 0x10

    def __init__(self, path: Path) -> None:
        self.path = path
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        watch = self.libc.inotify_add_watch(self.fd, bytes(path), self.IN_CLOSE_NOWRITE)
        if watch < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.at = path.stat().st_size // 2
        self.byte = path.read_bytes()[self.at : self.at + 1]
        self.spoiled = False

    def _reads(self, timeout: float) -> int:
        """Reads of the file that ended within ``timeout`` seconds (0 if none did)."""
        count = 0
        while select.select([self.fd], [], [], timeout)[0]:
            data = os.read(self.fd, 4096)
            at = 0
            while at < len(data):
                _, mask, _, size = struct.unpack_from("iIII", data, at)
                count += bool(mask & self.IN_CLOSE_NOWRITE)
                at += 16 + size
            timeout = 0
        return count

    def _write(self, byte: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, byte, self.at)
        finally:
            os.close(fd)

    def spoil(self) -> None:
        self._reads(0)  # corral's own check of the export
        self._write(bytes([self.byte[0] ^ 0xFF]))
        self.spoiled = True

    def restore_after_a_read(self, timeout: float) -> bool:
        """Wait for one read of the spoiled file, then restore it; whether one came."""
        try:
            return self._reads(timeout) > 0
        finally:
            self.close()

    def close(self) -> None:
        if self.spoiled:
            self._write(self.byte)
            self.spoiled = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def test_a_bad_chunk_is_fetched_again(
    testbed: cluster.Testbed, tmp_path: Path, transport: str
) -> None:
    if transport in NO_SPOILING:
        pytest.skip(f"{transport}: {NO_SPOILING[transport]}")
    home = testbed.settings.home
    nodes = testbed.require_state().nodes
    consoles = {n.name: testbed.nodes_dir / n.name / "console.log" for n in nodes}
    seen = {name: path.stat().st_size if path.exists() else 0 for name, path in consoles.items()}
    version = add_image(home, tmp_path, seed=34, random_mb=6)
    ident = start(home, version, transport)
    chunks = sorted((version.exports_dir / "chunks").glob("*.bin"))
    assert len(chunks) >= 2
    bad = len(chunks) - 1
    spoiler = Spoiler(chunks[bad])
    try:
        # once a node has its plan, corral has checked the export; spoil it before the
        # first chunk goes out
        wait(lambda: any(p != "waiting" for p, *_ in rows(ident).values()), 120, "a plan")
        spoiler.spoil()
        early = [n for n, (p, b, *_) in rows(ident).items() if p == "receiving" and b > 0]
        assert not early, f"too late to spoil chunk {bad}: {early} receiving"
        assert spoiler.restore_after_a_read(120), f"nobody read chunk {bad}"
    finally:
        spoiler.close()
    wait(lambda: state(ident) != "running", 180, "the deployment to end")
    ended = rows(ident)
    assert all(p == "done" for p, *_ in ended.values()), ended
    check_nodes(testbed, version, tmp_path)
    said = re.compile(
        rf"chunk 0*{bad}\b.*(did not match|does not match|sha256 [0-9a-f]{{64}}, the plan)"
    )
    caught = []
    for name, path in consoles.items():
        with open(path, "rb") as f:
            f.seek(seen[name])
            if said.search(f.read().decode(errors="replace")):
                caught.append(name)
    assert caught, f"no node said chunk {bad} did not match its sha256"
    print(f"{transport}: chunk {bad} caught by its sha256 on {caught}")


def test_a_killed_peer_is_bypassed(
    testbed: cluster.Testbed, tmp_path: Path, transport: str, links: Callable[[str], None]
) -> None:
    if transport in NO_PEERS:
        pytest.skip(f"{transport}: {NO_PEERS[transport]}")
    home = testbed.settings.home
    nodes = testbed.require_state().nodes
    victim, after = nodes[2], nodes[3]
    # 24 MiB: at 16 Mbit/s the nodes of a chain, which start together once it is formed,
    # are mid-stream for seconds, longer than their reports take to be seen here
    version = add_image(home, tmp_path, seed=32, random_mb=24)
    log = testbed.nodes_dir / after.name / "agent.log"
    logged = log.stat().st_size if log.exists() else 0
    links(HALF_LINK)
    ident = start(home, version, transport)
    pair = [victim.name, after.name]  # the killed node, and the one that must pass it
    wait(half_way(ident, pair), 120, lambda: f"{' and '.join(pair)} half way: {rows(ident)}")
    testbed.power(victim.name, "off")
    wait(lambda: rows(ident)[victim.name][0] == "failed", 60, f"{victim.name} reported failed")
    wait(lambda: state(ident) != "running", 120, "the deployment to end")
    ended = rows(ident)
    assert "no report for" in ended[victim.name][3], ended[victim.name]
    others = [n for n in nodes if n.name != victim.name]
    assert all(ended[n.name][0] == "done" for n in others), ended
    expected = tree_digest(version.rootfs)
    for info in others:
        assert node_root_digest(info.loop, tmp_path / f"mnt-{info.name}") == expected, info.name
    with open(log, "rb") as f:
        f.seek(logged)
        lines = f.read().decode(errors="replace").splitlines()
    said = [line for line in lines if victim.name in line or victim.ip in line][-3:]
    print(f"{after.name} after {victim.name} was killed: {said}")


def test_cancel_stops_it(
    testbed: cluster.Testbed, tmp_path: Path, transport: str, links: Callable[[str], None]
) -> None:
    home = testbed.settings.home
    bed = testbed.require_state()
    nodes = bed.nodes
    before = set(namespace_pid_map(cluster.SERVER_NS).get(cluster.SERVER_NS, []))
    consoles = {n.name: testbed.nodes_dir / n.name / "console.log" for n in nodes}
    seen = {name: path.stat().st_size if path.exists() else 0 for name, path in consoles.items()}
    version = add_image(home, tmp_path, seed=33, random_mb=12)
    links(CANCEL_LINK)
    ident = start(home, version, transport)
    names = [n.name for n in nodes]
    wait(half_way(ident, names), 120, lambda: f"every node half way: {rows(ident)}")
    result = corral("deployment", "cancel", str(ident), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({NODES} node(s) were still going)" in result.stdout
    cancelled = rows(ident)
    assert all(p == "cancelled" and 0 < b < t for p, b, t, _ in cancelled.values()), cancelled

    def running() -> dict[str, list[int]]:
        """What still runs of the deployment: each node's processes, and corral's own
        beyond what it ran before (the rsync daemon, which serves every deployment)."""
        left = {n.namespace: namespace_pid_map(n.namespace).get(n.namespace, []) for n in nodes}
        server_side = set(namespace_pid_map(cluster.SERVER_NS).get(cluster.SERVER_NS, []))
        left[cluster.SERVER_NS] = sorted(server_side - before - rsync_daemon(home))
        return {k: v for k, v in left.items() if v}

    wait(lambda: not running(), 30, lambda: f"every process of the deployment to end: {running()}")
    wait(lambda: not transfers(bed), 30, lambda: f"corral's transfers to end: {transfers(bed)}")
    egress = testbed.server_egress_bytes()
    time.sleep(0.5)
    assert testbed.server_egress_bytes() - egress < 64 << 10  # nothing goes out any more
    assert rows(ident) == cancelled  # and nothing came in
    for name, path in consoles.items():
        with open(path, "rb") as f:
            f.seek(seen[name])
            text = f.read().decode(errors="replace")
        assert "corral cancelled the deployment" in text, f"{name} did not hear of the cancel"


def rsync_daemon(home: Path) -> set[int]:
    """The rsync daemon corral serve runs, if it runs one."""
    path = home / "rsync" / "rsyncd.pid"
    text = path.read_text().strip() if path.exists() else ""
    return {int(text)} if text.isdigit() else set()


#: TCP states of a connection still open at corral's end: established, and closed by the
#: node but not yet by corral (CLOSE_WAIT).
OPEN = {"01", "08"}


def transfers(state: cluster.TestbedState) -> list[str]:
    """corral's TCP connections to the nodes still open, as host:port pairs."""
    assert state.server_pid
    net = ipaddress.IPv4Network(state.network)
    found = []
    for line in Path(f"/proc/{state.server_pid}/net/tcp").read_text().splitlines()[1:]:
        local, remote, status = line.split()[1:4]
        host, port = remote.split(":")
        address = ipaddress.IPv4Address(int(host, 16).to_bytes(4, "little"))
        if status in OPEN and address in net and str(address) != state.server_ip:
            found.append(f"{address}:{int(port, 16)} (local {int(local.split(':')[1], 16)})")
    return found
