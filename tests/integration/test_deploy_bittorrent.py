"""The bittorrent transport on real parts: corral's tracker and libtorrent seed, the agent's
libtorrent swarm and its unpacking.

First on the loopback interface in this process (two agents and the seed on 127.0.0.1, the
HTTP fallback from a small chunk server), then end to end on the virtual cluster: five
nodes deployed with ``--transport bittorrent`` under 1% packet loss must end with exactly
the image's files while the server sends well under one copy per node. Without loss, and
the transports' other promises, are test_deploy_contract.py's.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corral.agent.plan import Chunk, Disk, Identity, ImageInfo, Plan, TransportInfo
from corral.agent.receivers.base import Context, Job, Received
from corral.agent.receivers.bittorrent import feed as bittorrent_feed
from corral.agent.receivers.bittorrent.receiver import SCRATCH, BitTorrentReceiver
from corral.agent.report import Client
from corral.config import Settings
from corral.deploy.store import Deployments
from corral.deploy.transports import bittorrent_seed
from corral.deploy.transports.base import Member
from corral.deploy.transports.bittorrent import BitTorrentTransport
from corral.images.catalog import image_store
from corral.images.exports import STREAM_INDEX, Chunked, build_exports, verify_export
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.run import pid_alive
from corral.testbed import cluster
from tests.integration import deploybed
from tests.integration.deploybed import (
    NODES,
    add_image,
    deploy_everywhere,
    make_tree,
    shape,
    stream_size,
    tree_digest,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]


# --- on the loopback interface ---------------------------------------------------------

#: corral's address on the loopback interface, and its nodes' (all of 127/8 is local): the
#: agents keep the seed away by its address, so the seed needs one of its own.
SERVER = "127.0.0.2"
NODE_ADDRESS = {"a": "127.0.0.11", "b": "127.0.0.12"}


@pytest.fixture
def version(tmp_path: Path) -> ImageVersion:
    tree = tmp_path / "tree"
    make_tree(tree, seed=11, random_mb=2)
    v = image_store(tmp_path / "home").import_tree("small", tree)
    build_exports(v, chunk_size=512 << 10, which=["stream"])  # several chunks of 2 pieces
    return ImageVersion.load(v.path)


@pytest.fixture
def chunk_server(version: ImageVersion) -> Iterator[str]:
    """corral's chunk URLs for the HTTP fallback: /images/small/1/chunks/N.bin."""
    served: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            path = version.exports_dir / "chunks" / name
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            served.append(name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer((SERVER, 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{SERVER}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def loop_plan(version: ImageVersion, node: str, params: dict[str, Any]) -> Plan:
    index = json.loads((version.path / STREAM_INDEX).read_text())
    size = index["chunk_size"]
    return Plan(
        deployment=1,
        node=node,
        image=ImageInfo(
            ref=version.ref,
            stream_sha256=index["sha256"],
            stream_size=index["size"],
            chunk_size=size,
            chunks=[
                Chunk(h, min(size, index["size"] - i * size)) for i, h in enumerate(index["chunks"])
            ],
            tree_bytes=int(version.manifest["size_bytes"]),
            files=int(version.manifest["file_count"]),
        ),
        transport=TransportInfo("bittorrent", params),
        disk=Disk("", "gpt", []),
        identity=Identity(node, [], {}, [], None),
        bootloader="none",
        post_script="",
    )


def receive(plan: Plan, server: str, target: Path) -> Received:
    target.mkdir()

    class Receiver(BitTorrentReceiver):
        address = NODE_ADDRESS[plan.node]

    receiver = Receiver(Context(Client(server, tries=2, backoff=0.1)))
    return receiver.receive(Job(plan, target, lambda done, total: None, threading.Event()))


def loopback_transport(chunk_server: str, tmp_path: Path) -> BitTorrentTransport:
    """corral's side on the loopback interface: its tracker and seed on free ports."""
    settings = Settings(home=tmp_path / "home", server_url=chunk_server, address=SERVER)
    return BitTorrentTransport(settings, tracker_port=0, seed_port=0)


@pytest.mark.parametrize("racks", [("r1", "r1"), ("r1", "r2")], ids=["one rack", "two racks"])
def test_two_agents_and_the_seed_on_loopback(
    version: ImageVersion,
    chunk_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    racks: tuple[str, str],
) -> None:
    caplog.set_level("INFO", logger="corral.agent")
    transport = loopback_transport(chunk_server, tmp_path)
    try:
        transport.prepare(Chunked(version))
        members = [Member(n, ip, r) for (n, ip), r in zip(NODE_ADDRESS.items(), racks, strict=True)]
        transport.start(1, Chunked(version), members)
        params = {n: transport.params(Chunked(version), n) for n in NODE_ADDRESS}
        assert (params["a"]["rack"], params["b"]["rack"]) == racks
        if racks[0] == racks[1]:
            # one rack: the tracker gives each the other, and the agents know their rack's
            assert params["b"]["rack_peers"] == sorted(NODE_ADDRESS.values())
            assert params["a"]["lane"] == params["b"]["lane"] == []
        else:
            # two: each brings the other's stripe into its rack (its lane), from the other
            # (its partner); then it trades with its own rack only (libtorrent's IP filter)
            assert params["b"]["rack_peers"] == [NODE_ADDRESS["b"]]
            assert (params["a"]["lane"], params["b"]["lane"]) == ([1], [0])
            assert params["a"]["lane_peers"] == [NODE_ADDRESS["b"]]
        assert params["a"]["tracker"].startswith(f"http://{SERVER}:")
        assert params["a"]["seed"].startswith(f"{SERVER}:")
        assert params["a"]["base"] == f"{chunk_server}/images/small/1"
        assert (params["a"]["stripe"], params["b"]["stripe"]) == ([0, 2], [1, 2])
        assert params["a"]["stripe_turn"] == len(set(racks))  # the racks take turns
        with ThreadPoolExecutor(2) as pool:
            jobs = [
                pool.submit(receive, loop_plan(version, n, params[n]), chunk_server, tmp_path / n)
                for n in NODE_ADDRESS
            ]
            results = [job.result(timeout=120) for job in jobs]
        chunks = len(loop_plan(version, "a", params["a"]).image.chunks)
        assert chunks >= 4
        for node, result in zip(NODE_ADDRESS, results, strict=True):
            assert result.details["swarm"] == chunks and result.details["http"] == 0
            assert not (tmp_path / node / SCRATCH).exists()  # the scratch copy is gone
            assert tree_digest(tmp_path / node) == tree_digest(version.rootfs)
        # in two racks, each node's lane came from the other's lane session, not the seed
        lanes = 0 if racks[0] == racks[1] else 2
        assert caplog.text.count("my lane is here") == lanes
        assert caplog.text.count("my lane's session on") == lanes
        assert "of my lane at no peer" not in caplog.text
        assert transport.seeder is not None and transport.tracker is not None
        transport.finish(1, version)
        assert transport.seeder is None and transport.tracker is None  # the last session
    finally:
        transport.close()
    # the seed read the chunk files in place and changed none of them
    verify_export(version, "stream")


def test_the_seed_runs_apart_and_comes_back_after_a_crash_or_a_hang(
    version: ImageVersion, chunk_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bittorrent_seed, "CALL_TIMEOUT", 1.0)
    transport = loopback_transport(chunk_server, tmp_path)
    try:
        transport.start(3, Chunked(version), [Member("a", NODE_ADDRESS["a"])])
        seed = transport.seeder
        assert seed is not None and seed.pid not in (0, os.getpid())
        port, first = seed.port, seed.pid
        os.kill(first, signal.SIGKILL)
        waitpid_gone(first)
        assert transport.sent().get(version.ref, 0) == 0  # nothing yet; the call restarts it
        assert seed.restarts == 1 and seed.pid not in (0, first) and seed.port == port
        hung = seed.pid
        os.kill(hung, signal.SIGSTOP)  # a seed that answers nothing is killed and replaced
        assert seed.errors() == []
        assert seed.restarts == 2 and seed.pid not in (0, hung) and seed.port == port
        waitpid_gone(hung)
        # a stop sent to serve's process group is serve's to handle: the seed stays
        os.kill(seed.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert seed.errors() == [] and seed.restarts == 2 and pid_alive(seed.pid)
        # the new seed seeds the session's torrent: one node, its stripe all of it
        params = transport.params(Chunked(version), "a")
        result = receive(loop_plan(version, "a", params), chunk_server, tmp_path / "a")
        chunks = len(loop_plan(version, "a", params).image.chunks)
        assert result.details["swarm"] == chunks and result.details["http"] == 0
        assert tree_digest(tmp_path / "a") == tree_digest(version.rootfs)
        assert transport.sent()[version.ref] >= Chunked(version).index()["size"]
        last = seed.pid
    finally:
        transport.close()
    waitpid_gone(last)  # closing the transport ends the seed's process


def waitpid_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` is no longer running (reaped by multiprocessing, or a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} still runs after {timeout:.0f} s")


def test_without_a_swarm_the_chunks_come_over_http(
    version: ImageVersion, chunk_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torrent whose tracker is gone (no peers, no seed): every chunk after the stall."""
    monkeypatch.setattr(bittorrent_feed, "STALL_TIMEOUT", 1.0)
    transport = loopback_transport(chunk_server, tmp_path)
    try:
        transport.start(2, Chunked(version), [Member("a", NODE_ADDRESS["a"])])
        params = transport.params(Chunked(version), "a")
    finally:
        transport.close()
    result = receive(loop_plan(version, "a", params), chunk_server, tmp_path / "a")
    assert result.details["http"] == len(loop_plan(version, "a", params).image.chunks)
    assert tree_digest(tmp_path / "a") == tree_digest(version.rootfs)
    # no libtorrent on the node, or no torrent in the plan: plain HTTP, said in the log
    monkeypatch.setattr(BitTorrentReceiver, "engine", staticmethod(lambda: None))
    result = receive(loop_plan(version, "a", params), chunk_server, tmp_path / "b")
    assert "chunks" in result.details and "swarm" not in result.details
    assert tree_digest(tmp_path / "b") == tree_digest(version.rootfs)


# --- on the virtual cluster ------------------------------------------------------------

#: The nodes' links during the test: slow enough that the transfer lasts a few seconds,
#: so that the nodes have time to exchange pieces.
LINK = "50mbit"


def deploy_and_measure(bed: cluster.Testbed, version: ImageVersion, tmp_path: Path) -> float:
    egress = deploy_everywhere(bed, version, tmp_path, "--transport", "bittorrent")
    with db.session() as s:
        d = Deployments(s).recent()[0]
        assert d.state == "done" and d.transport == "bittorrent"
        assert all(n.bytes == n.total == stream_size(version) for n in d.nodes)
    ratio = egress / stream_size(version)
    print(f"bittorrent, {NODES} nodes: server egress {egress} bytes = {ratio:.2f} x S")
    return ratio


def test_bittorrent_with_one_percent_loss(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=22, random_mb=12)
    shape(testbed, LINK, loss=0.01)
    try:
        ratio = deploy_and_measure(testbed, version, tmp_path)
    finally:
        shape(testbed, deploybed.LINK)
    assert ratio <= 2.0  # measured: 1.03-1.04 x S
