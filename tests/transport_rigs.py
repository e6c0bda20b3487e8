"""Each transport's receivers on fakes, one rig per transport, for the contract suite
(tests/unit/test_transport_contract.py): what feeds them is the test's, what they do with
it is the transport's own code, unpacking included (real ``zstd -d | tar -x``).

A rig knows where its transport's bytes come from and how to hold them there half way,
spoil one chunk of them or kill a node; the promises are checked the same way for all.
"""

from __future__ import annotations

import base64
import shlex
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from corral.agent.plan import Plan
from corral.agent.receivers import RECEIVERS, bittorrent, multicast, rsync, stream
from corral.agent.receivers.base import Context, Job, Received, Receiver
from corral.agent.receivers.bittorrent.receiver import BitTorrentReceiver
from corral.agent.receivers.chain.receiver import ChainReceiver
from corral.agent.receivers.chain.relay import Relay
from corral.agent.receivers.chain.window import Window
from corral.agent.receivers.multicast import MulticastReceiver
from corral.agent.report import Client
from corral.agent.wire.chain import session_tag
from corral.images.store import ImageVersion
from tests.fakes import (
    RSYNC_LINK,
    UDP_RECEIVER,
    ChunkServer,
    FakeDownload,
    World,
    WorldSwarm,
    free_port,
    spoiled,
    stream_plan,
)

#: How long a node may take for anything here (the images are a few hundred KiB).
PATIENCE = 30.0


@dataclass
class Image:
    """The image every rig sends: its tree and its stream, cut in small chunks."""

    version: ImageVersion
    chunks: list[bytes]

    @property
    def tree(self) -> Path:
        return self.version.rootfs

    def upto(self, count: int) -> int:
        """Bytes of the stream in its first ``count`` chunks."""
        return sum(len(c) for c in self.chunks[:count])


@dataclass
class Node:
    """One node's receive, in a thread of its own, into its own target directory."""

    name: str
    target: Path
    receiver: Receiver
    plan: Plan
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: int = 0  # the last byte count reported
    result: Received | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.target.mkdir(parents=True, exist_ok=True)

        def report(done: int, total: int) -> None:
            self.progress = done

        def run() -> None:
            try:
                self.result = self.receiver.receive(
                    Job(self.plan, self.target, report, self.cancel)
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, name=f"node-{self.name}", daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), f"{self.name} still receiving"


def wait_for(check: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class Rig:
    """One transport's nodes and what feeds them.

    The source sends the whole image unless :meth:`hold` was called first (then the
    first ``count`` chunks, or as much of the transfer, until :meth:`release`).
    """

    name: ClassVar[str] = ""
    #: why the transport has no chunk that could be spoiled ("" if it has)
    no_chunks: ClassVar[str] = ""
    #: why no node takes the image from another ("" if nodes do)
    no_peers: ClassVar[str] = ""
    #: processes this rig's receivers start, by module (each module's ``spawn``)
    spawning: ClassVar[tuple[types.ModuleType, ...]] = (stream,)

    def __init__(self, image: Image, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.image = image
        self.tmp = tmp
        self.monkeypatch = monkeypatch
        self.held: int | None = None
        self.bad: int | None = None
        #: every process the receivers started
        self.processes: list[subprocess.Popen[bytes]] = []
        for module in self.spawning:
            self._record(module)

    def _record(self, module: types.ModuleType) -> None:
        real = module.spawn

        def spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
            proc: subprocess.Popen[bytes] = real(argv, **kw)
            self.processes.append(proc)
            return proc

        self.monkeypatch.setattr(module, "spawn", spawn)

    # --- what the tests say --------------------------------------------------------------

    def hold(self, count: int) -> None:
        self.held = count

    def release(self) -> None:
        self.held = None

    def spoil(self, index: int) -> None:
        """The transport's own path delivers chunk ``index`` with a wrong byte."""
        self.bad = index

    def nodes(self, count: int) -> list[Node]:
        return [self.node(i, count) for i in range(count)]

    def midway(self, node: Node) -> bool:
        """Whether ``node`` holds all it can get while the source holds."""
        assert self.held is not None
        return node.progress >= self.image.upto(self.held)

    def kill(self, node: Node) -> None:
        """The node dies: its receive stops where it is, its sockets close."""
        node.cancel.set()
        node.join()

    def close(self) -> None:
        pass

    # --- what each rig says ---------------------------------------------------------------

    def node(self, index: int, count: int) -> Node:
        raise NotImplementedError

    def fetched_again(self, node: Node, index: int) -> bool:
        """Whether ``node`` saw chunk ``index`` spoiled and fetched it again."""
        raise NotImplementedError

    def bypassed(self, node: Node, victim: Node) -> bool:
        """Whether ``node`` went on without ``victim``, which it was taking from."""
        raise NotImplementedError


class HeldChunks(ChunkServer):
    """corral's chunk route for one node: chunk ``bad`` spoiled once, and no answer for
    chunks from ``rig.held`` on until the rig releases them (or the node is cancelled:
    a closed connection)."""

    def __init__(
        self, rig: Rig, chunks: list[bytes], spoil: int | None, cancel: threading.Event
    ) -> None:
        super().__init__(chunks, corrupt=[] if spoil is None else [spoil])
        self.rig = rig
        self.cancel = cancel

    def download(self, url: str, *, start: int = 0, auth: bool = True) -> FakeDownload:
        index = int(url.rsplit("/", 1)[-1].split(".")[0])
        while self.rig.held is not None and index >= self.rig.held and not self.cancel.is_set():
            time.sleep(0.01)
        return super().download(url, start=start, auth=auth)


class HttpRig(Rig):
    name = "http"
    no_peers = "every node takes the image from corral alone: there is no peer to kill"

    def __init__(self, image: Image, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(image, tmp, monkeypatch)
        self.servers: dict[str, ChunkServer] = {}

    def node(self, index: int, count: int) -> Node:
        name = f"n{index + 1}"
        cancel = threading.Event()
        server = self.servers[name] = HeldChunks(self, self.image.chunks, self.bad, cancel)
        plan = stream_plan(self.image.chunks, "http", {"base": "http://s/images/img/1"}, node=name)
        receiver = RECEIVERS["http"](Context(cast(Client, server), tries=3))
        return Node(name, self.tmp / name, receiver, plan, cancel)

    def fetched_again(self, node: Node, index: int) -> bool:
        gets = self.servers[node.name].gets
        return cast(Any, node.receiver).refetched == [index] and gets.count(index) == 2


class RsyncRig(Rig):
    """rsync itself, from the image's tree through a remote shell that can hold it."""

    name = "rsync"
    no_chunks = (
        "rsync sends the image's tree, not the chunked stream: there is no chunk to spoil "
        "(rsync checks each file it writes against its own whole-file checksum)"
    )
    no_peers = "every node takes the image from corral alone: there is no peer to kill"
    spawning = (rsync,)
    #: bytes the link passes before it holds: the file list and a little data
    hold_bytes = 64 << 10

    def __init__(self, image: Image, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(image, tmp, monkeypatch)
        link = tmp / "link.py"
        link.write_text(RSYNC_LINK)
        self.holding = tmp / "holding"
        monkeypatch.setenv("RSYNC_RSH", f"{shlex.quote(sys.executable)} {shlex.quote(str(link))}")
        monkeypatch.setenv("LINK_HOLD", str(self.hold_bytes))
        monkeypatch.setenv("LINK_HOLDING", str(self.holding))

    def hold(self, count: int) -> None:
        super().hold(count)
        self.holding.touch()

    def release(self) -> None:
        super().release()
        self.holding.unlink(missing_ok=True)

    def midway(self, node: Node) -> bool:
        # one link per node, in the order they started; each marks that it waits
        return len(list(self.tmp.glob("holding.*"))) >= int(node.name[1:])

    def node(self, index: int, count: int) -> Node:
        name = f"n{index + 1}"
        url = f"corral:{self.image.tree}/"
        plan = stream_plan(self.image.chunks, "rsync", {"url": url}, node=name)
        return Node(name, self.tmp / name, RECEIVERS["rsync"](Context(None, poll=0.02)), plan)


class StandInMulticast(MulticastReceiver):
    """The multicast receiver with udp-receiver's stand-in for udp-receiver."""

    rig: ClassVar[MulticastRig]

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return self.rig.udp_receiver()

    def interface_name(self, address: str) -> str | None:
        return None


class MulticastRig(Rig):
    name = "multicast"
    no_peers = (
        "the nodes take nothing from each other: udp-sender dropping a receiver that died "
        "is corral's side (tests/integration/test_deploy_multicast.py)"
    )
    spawning = (stream, multicast)

    def __init__(self, image: Image, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(image, tmp, monkeypatch)
        self.script = tmp / "udp_receiver.py"
        self.script.write_text(UDP_RECEIVER)
        self.go = tmp / "go"
        self.servers: dict[str, ChunkServer] = {}
        self.cls = type("Receiver", (StandInMulticast,), {"rig": self})

    def release(self) -> None:
        super().release()
        self.go.touch()

    def udp_receiver(self) -> subprocess.Popen[bytes]:
        chunks = list(self.image.chunks)
        if self.bad is not None:
            chunks[self.bad] = spoiled(chunks[self.bad])
        sent = self.tmp / "session.bin"
        sent.write_bytes(b"".join(chunks))
        argv = [sys.executable, str(self.script), str(sent), "0", "yes", "0"]
        if self.held is not None:
            argv += [str(self.image.upto(self.held)), str(self.go)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.processes.append(proc)
        return proc

    def node(self, index: int, count: int) -> Node:
        name = f"n{index + 1}"
        server = self.servers[name] = ChunkServer(self.image.chunks)
        sha = stream_plan(self.image.chunks, "multicast", {}).image.stream_sha256
        session = {
            "tag": f"7/img:1/{sha}",
            "rdv": "239.194.0.1",
            "portbase": 24002,
            "interface": "127.0.0.1",
            "max_bitrate": 19_000_000,
            "max_wait": 1.0,
        }
        params = {"base": "http://s/images/img/1", "session": session}
        plan = stream_plan(self.image.chunks, "multicast", params, node=name)
        receiver = self.cls(Context(cast(Client, server), tries=3, poll=0.02))
        return Node(name, self.tmp / name, receiver, plan)

    def fetched_again(self, node: Node, index: int) -> bool:
        left = cast(MulticastReceiver, node.receiver).left
        gets = self.servers[node.name].gets
        return "did not match" in left and gets[:1] == [index]


class FastChain(ChainReceiver):
    """The chain's patience at loopback scale; no passing for lag (on loopback the first
    node can be chunks ahead for a moment)."""

    heartbeat = 0.1
    silence = 3.0
    start_patience = 3.0
    grace = 0.5
    drain_idle = 1.0
    linger = 1.0
    lag_bytes = 1 << 40
    window_chunks = 64  # a node that changes upstream finds every chunk it needs there


class ChainRig(Rig):
    """Nodes on 127.0.0.2, 127.0.0.3... pulling from a head whose window the rig fills."""

    name = "chain"

    def __init__(self, image: Image, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(image, tmp, monkeypatch)
        chunks = image.chunks
        self.tag = session_tag(7, "img:1", stream_plan(chunks, "chain", {}).image.stream_sha256)
        self.window = Window([len(c) for c in chunks], keep=len(chunks))
        self.head = Relay(("127.0.0.1", 0), self.tag, self.window, heartbeat=0.1)
        self.head.start()
        self.sent = 0
        self.port = free_port()
        self.servers: dict[str, ChunkServer] = {}

    def _send(self) -> None:
        upto = len(self.image.chunks) if self.held is None else self.held
        for index in range(self.sent, upto):
            data = self.image.chunks[index]
            self.window.complete(index, spoiled(data) if index == self.bad else data)
        self.sent = max(self.sent, upto)

    def nodes(self, count: int) -> list[Node]:
        self._send()
        return super().nodes(count)

    def release(self) -> None:
        super().release()
        self._send()

    def node(self, index: int, count: int) -> Node:
        assert self.head.sock is not None
        members = [[f"n{i + 1}", f"127.0.0.{i + 2}"] for i in range(count)]
        params = {
            "session": self.tag,
            "position": index,
            "members": members,
            "relay_port": self.port,
            "head": list(self.head.sock.getsockname()),
            "base": "http://127.0.0.1:1/images/img/1",
        }
        name = members[index][0]
        server = self.servers[name] = ChunkServer(self.image.chunks)
        plan = stream_plan(self.image.chunks, "chain", params, node=name)
        return Node(name, self.tmp / name, FastChain(Context(cast(Client, server), tries=2)), plan)

    def fetched_again(self, node: Node, index: int) -> bool:
        assert node.result is not None
        return node.result.details["bad"] >= 1

    def bypassed(self, node: Node, victim: Node) -> bool:
        assert node.result is not None
        # the node before the victim took over where the victim left; HTTP was not needed
        return node.result.details["switches"] == 1 and node.result.details["from_http"] == 0

    def close(self) -> None:
        self.head.close()


class BitTorrentRig(Rig):
    """The bittorrent receiver on a :class:`World` of fake swarms, each node with its
    stripe of the seed's pieces, and the seed's patience made short."""

    name = "bittorrent"
    piece = 16 << 10
    knobs: ClassVar[dict[str, float]] = {
        "LOOK_TIME": 0.05,
        "RESCUE_IDLE": 0.2,
        "ORPHAN_WAIT": 0.5,
        "ALONE_WAIT": 0.5,
        "STRIPE_TIMEOUT": 1.0,
    }

    def __init__(self, image: Image, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(image, tmp, monkeypatch)
        for knob, value in self.knobs.items():
            monkeypatch.setattr(bittorrent.seed, knob, value)
        self.world = World(image.chunks, self.piece)
        self.servers: dict[str, ChunkServer] = {}
        self.held_at_kill: list[int] = []
        rig = self

        class InWorld(BitTorrentReceiver):
            engine = staticmethod(lambda: types.ModuleType("libtorrent"))

            def make_swarm(self, lt: Any, torrent: bytes, scratch: Path, address: str,
                           seed: tuple[str, int] | None) -> Any:  # fmt: skip
                return rig.world.swarms[self.node_name]

            node_name = ""

        self.cls = InWorld

    def _seed(self) -> None:
        upto = len(self.image.chunks) if self.held is None else self.held
        self.world.seed(self.image.upto(upto))

    def nodes(self, count: int) -> list[Node]:
        self._seed()
        return super().nodes(count)

    def hold(self, count: int) -> None:
        # the seed holds the rest, and each node gets only its stripe of what it has:
        # half way, a node holds pieces that no other node has
        super().hold(count)
        self.world.swapping = False
        self.world.stripes_only = True

    def release(self) -> None:
        super().release()
        self.world.swapping = True
        self.world.stripes_only = False
        self._seed()

    def midway(self, node: Node) -> bool:
        world = self.world
        have = world.swarms[node.name].have
        return all(have[p] for p in world.stripe(node.name) if p < world.seeded)

    def kill(self, node: Node) -> None:
        world = self.world
        with world.lock:
            world.dead.add(node.name)
            self.held_at_kill = [
                p
                for p, held in enumerate(world.swarms[node.name].have)
                if held and not any(s.have[p] for n, s in world.swarms.items() if n != node.name)
            ]
        super().kill(node)

    def spoil(self, index: int) -> None:
        super().spoil(index)
        self.world.bad = self.image.upto(index) // self.piece

    def node(self, index: int, count: int) -> Node:
        name = f"n{index + 1}"
        self.world.swarms[name] = WorldSwarm(self.world, name, len(self.image.chunks))
        server = self.servers[name] = ChunkServer(self.image.chunks)
        params = {
            "torrent": base64.b64encode(b"a torrent").decode(),
            "seed": "127.0.0.1:6881",
            "stripe": [index, count],
            "tracker": "",
            "base": "http://s/images/img/1",
        }
        plan = stream_plan(self.image.chunks, "bittorrent", params, node=name)
        receiver = self.cls(Context(cast(Client, server), tries=3))
        cast(Any, receiver).node_name = name
        return Node(name, self.tmp / name, receiver, plan)

    def fetched_again(self, node: Node, index: int) -> bool:
        assert node.result is not None
        return node.result.details["mismatched"] == 1 and index in self.servers[node.name].gets

    def bypassed(self, node: Node, victim: Node) -> bool:
        swarm = self.world.swarms[node.name]
        # it held pieces that only the victim had, and took them elsewhere
        return bool(self.held_at_kill) and all(
            swarm.sources.get(p) not in (None, victim.name) for p in self.held_at_kill
        )


#: transport name -> its rig; a transport registered without one fails the suite
RIGS: dict[str, type[Rig]] = {
    rig.name: rig for rig in (HttpRig, RsyncRig, MulticastRig, ChainRig, BitTorrentRig)
}
