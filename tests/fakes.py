"""Fakes that several test modules share: corral's chunk route, as the agent's receivers
see it through ``Client.download`` (their HTTP catch-up); stand-ins for udp-receiver and
for rsync's link; an unpacker that keeps what it is given; an image version's stream
export and a plan for it, written from chunks; a BitTorrent swarm (:class:`World`)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from corral.agent.plan import Chunk, Disk, Identity, ImageInfo, Plan, TransportInfo
from corral.agent.receivers.stream import Unpacker
from corral.images.store import ImageVersion

#: udp-receiver's stand-in (``python UDP_RECEIVER DATA CODE CONNECT SLEEP [HOLD GO]``): says
#: it connected (unless CONNECT is "no"), writes the file DATA to stdout in small pieces,
#: waiting after HOLD bytes until the file GO exists, then sleeps SLEEP seconds and exits
#: with CODE (1: as udp-sender dropped it).
UDP_RECEIVER = r"""
import os, sys, time
data_file, code, connect, sleep = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
hold, go = (int(sys.argv[5]), sys.argv[6]) if len(sys.argv) > 6 else (-1, "")
if connect == "yes":
    sys.stderr.write("Udp-receiver 20120424\nConnected as #0 to 10.0.0.1\n")
    sys.stderr.flush()
data = open(data_file, "rb").read()
for i in range(0, len(data), 50000):
    if 0 <= hold <= i:
        while not os.path.exists(go):
            time.sleep(0.01)
        hold = -1
    os.write(1, data[i:i + 50000])
    time.sleep(0.005)
time.sleep(sleep)
if code == 1:
    sys.stderr.write("Dropped by server now=40 last=14\n")
sys.exit(code)
"""


class FakeDownload:
    """One answer of the chunk route: ``data`` from ``offset`` (a Range request), cut at
    ``cut`` if given (the connection drops there: the answer is not complete)."""

    def __init__(self, data: bytes, offset: int, cut: int | None = None) -> None:
        self.data = data[offset:] if cut is None else data[offset:cut]
        self.offset = offset
        self.cut = cut
        self.length = len(data) - offset

    @property
    def complete(self) -> bool:
        return self.cut is None

    def read(self, size: int = 65536) -> bytes:
        piece, self.data = self.data[:size], self.data[size:]
        return piece

    def __enter__(self) -> FakeDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class ChunkServer:
    """corral's chunk route (``.../chunks/NNNNNNNN.bin``), for the receivers' catch-up; its
    ``host`` and ``port`` are what a client's say."""

    chunks: list[bytes]
    corrupt: list[int] = field(default_factory=list)  # chunk served corrupt, once per entry
    cut: dict[int, int] = field(default_factory=dict)  # chunk -> where the first answer stops
    gets: list[int] = field(default_factory=list)  # the chunks asked for, in order
    requests: list[tuple[str, int]] = field(default_factory=list)  # (file name, first byte)
    host: str = "127.0.0.1"
    port: int = 9

    def download(self, url: str, *, start: int = 0, auth: bool = True) -> FakeDownload:
        name = url.rsplit("/", 1)[-1]
        index = int(name.split(".")[0])
        self.gets.append(index)
        self.requests.append((name, start))
        data = self.chunks[index]
        if index in self.corrupt:
            self.corrupt.remove(index)
            return FakeDownload(bytes([data[0] ^ 0xFF]) + data[1:], start)
        if index in self.cut:
            return FakeDownload(data, start, self.cut.pop(index))
        return FakeDownload(data, start)


#: A remote shell for rsync (``RSYNC_RSH``) that the test can hold: it runs the sending
#: rsync on this host and carries its bytes, waiting after ``LINK_HOLD`` of them while the
#: file ``LINK_HOLDING`` exists (marking that it waits in ``LINK_HOLDING.PID``); it ends,
#: with its rsync, when the receiving side goes away.
RSYNC_LINK = r"""
import os, subprocess, sys, threading, time
hold, holding = int(os.environ["LINK_HOLD"]), os.environ["LINK_HOLDING"]
for fd in (0, 1):
    os.set_blocking(fd, True)  # rsync made its socket pair's ends non-blocking
server = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
gone = threading.Event()
def up():
    while data := os.read(0, 65536):
        server.stdin.write(data)
        server.stdin.flush()
    gone.set()
    server.stdin.close()
threading.Thread(target=up, daemon=True).start()
sent = 0
while data := os.read(server.stdout.fileno(), 4096):
    if sent >= hold and os.path.exists(holding):
        open(f"{holding}.{os.getpid()}", "w").close()
        while os.path.exists(holding) and not gone.is_set():
            time.sleep(0.01)
        if gone.is_set():
            break
    sent += len(data)
    while data:
        data = data[os.write(1, data) :]
server.kill()
server.wait()
"""


class KeptUnpacker:
    """An unpacker that keeps what it is given (``writes``, in order; optionally slowly),
    and is its own factory: it stands in for a receiver's ``make_unpacker``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.writes: list[bytes] = []
        self.delay = delay
        self.finished = False
        self.aborted = False

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def __call__(self, target: Path) -> Unpacker:
        return cast(Unpacker, self)

    def write(self, data: bytes) -> None:
        time.sleep(self.delay)
        self.writes.append(data)

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True


def stream_version(
    path: Path, chunks: list[bytes], name: str = "img", version: int = 1
) -> ImageVersion:
    """An image version at ``path`` whose stream export is ``chunks`` (and nothing else)."""
    exports = path / "exports"
    (exports / "chunks").mkdir(parents=True)
    for i, data in enumerate(chunks):
        (exports / "chunks" / f"{i:08d}.bin").write_bytes(data)
    index = {
        "chunk_size": max(map(len, chunks)),
        "count": len(chunks),
        "size": sum(map(len, chunks)),
        "sha256": hashlib.sha256(b"".join(chunks)).hexdigest(),
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
    }
    (exports / "stream.json").write_text(json.dumps(index))
    return ImageVersion(name, version, path, path / "rootfs", {})


def stream_plan(
    chunks: list[bytes],
    transport: str,
    params: dict[str, Any],
    *,
    node: str = "n1",
    deployment: int = 7,
    ref: str = "img:1",
) -> Plan:
    """A plan to receive the stream ``chunks`` by ``transport`` (no disk, no identity:
    what a receiver needs of it)."""
    return Plan(
        deployment=deployment,
        node=node,
        image=ImageInfo(
            ref,
            hashlib.sha256(b"".join(chunks)).hexdigest(),
            sum(map(len, chunks)),
            max(map(len, chunks)),
            [Chunk(hashlib.sha256(c).hexdigest(), len(c)) for c in chunks],
            tree_bytes=1,
            files=1,
        ),
        transport=TransportInfo(transport, params),
        disk=Disk("", "gpt", []),
        identity=Identity(node, [], {}, [], None),
        bootloader="none",
        post_script="",
    )


def free_port() -> int:
    """A TCP port nobody listens on, on the loopback interface, for now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spoiled(data: bytes) -> bytes:
    """``data`` with one byte changed, as a bit flipped in flight would."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


class World:
    """A BitTorrent swarm: corral's seed, holding the pieces of the stream it was given so
    far (:meth:`seed`), and the nodes, each taking a few wanted pieces per look from a live
    peer that has them or, while it uses the seed, from the seed. Peers swap pieces only
    while ``swapping``; a dead node's pieces are gone with it."""

    def __init__(self, chunks: list[bytes], piece: int) -> None:
        self.data = b"".join(chunks)
        self.piece = piece
        self.count = -(-len(self.data) // piece)
        self.seeded = 0  # pieces the seed holds, from the first
        self.swarms: dict[str, WorldSwarm] = {}
        self.dead: set[str] = set()
        self.swapping = True
        self.stripes_only = False  # the seed gives each node its own stripe only
        self.bad: int | None = None  # a piece read back wrong, once per node
        self.lock = threading.Lock()

    def stripe(self, name: str) -> range:
        """The pieces node ``name`` (n1, n2...) takes from the seed, as its plan says."""
        return range(int(name[1:]) - 1, self.count, len(self.swarms))

    def seed(self, upto: int) -> None:
        """The seed holds the pieces of the stream's first ``upto`` bytes."""
        with self.lock:
            self.seeded = min(self.count, max(self.seeded, -(-upto // self.piece)))

    def live(self, name: str) -> list[WorldSwarm]:
        return [s for n, s in self.swarms.items() if n != name and n not in self.dead]

    def piece_bytes(self, piece: int) -> bytes:
        return self.data[piece * self.piece : (piece + 1) * self.piece]


class WorldSwarm:
    """One node's view of the :class:`World` (a :class:`~corral.agent.receivers.bittorrent
    .swarm.Swarm`, with what the receiver asks of a libtorrent swarm besides)."""

    per_look = 2

    def __init__(self, world: World, name: str, num_files: int) -> None:
        self.world = world
        self.name = name
        self.piece_size = world.piece
        self.num_files = num_files
        self.have = [False] * world.count
        self.wanted: set[int] | None = None
        self.urgent: list[int] = []
        self.seeding = False
        self.spoiled = False
        self.left = False
        self.sources: dict[int, str] = {}  # piece -> where it came from

    def listen_port(self) -> int:
        return 0

    def pieces(self) -> Sequence[bool]:
        return list(self.have)

    def downloaded(self) -> int:
        return sum(len(self.world.piece_bytes(p)) for p, h in enumerate(self.have) if h)

    def received(self) -> int:
        return self.downloaded()

    def read(self, pieces: Sequence[int], timeout: float) -> dict[int, bytes]:
        out = {p: self.world.piece_bytes(p) for p in pieces if self.have[p]}
        bad = self.world.bad
        if bad in out and not self.spoiled:
            self.spoiled = True
            out[bad] = spoiled(out[bad])
        return out

    def add(self, pieces: Mapping[int, bytes]) -> None:
        for p in pieces:
            self.have[p] = True
            self.sources.setdefault(p, "http")

    def prioritize(self, urgent: Sequence[int]) -> None:
        self.urgent = list(urgent)

    def want(self, pieces: Sequence[int] | None) -> None:
        self.wanted = None if pieces is None else set(pieces)

    def use_seed(self, on: bool) -> None:
        self.seeding = on

    def reannounce(self) -> None:
        """The world has no tracker: the agent's Latecomers find none, and linger by the
        peers alone."""

    def availability(self) -> Sequence[int]:
        peers = self.world.live(self.name)
        return [sum(s.have[p] for s in peers) for p in range(self.world.count)]

    def present(self) -> tuple[int, int]:
        names = sorted(
            [self.name, *(s.name for s in self.world.live(self.name) if not all(s.have))]
        )
        return names.index(self.name), len(names)

    def peers_in_need(self, min_rate: float, known_for: float = 0.0) -> int:
        mine = {p for p, h in enumerate(self.have) if h}
        return sum(1 for s in self.world.live(self.name) if any(not s.have[p] for p in mine))

    def heard(self) -> bool:
        return True

    def connected(self) -> int:
        return len(self.world.live(self.name))

    def addresses(self) -> set[str]:
        return {s.name for s in self.world.live(self.name)}

    def wait(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.01))
        world = self.world
        with world.lock:
            if self.name in world.dead:
                return
            wanted = [
                p
                for p in self.urgent + list(range(world.count))
                if not self.have[p] and (self.wanted is None or p in self.wanted)
            ]
            got = 0
            for p in dict.fromkeys(wanted):
                peer = next((s for s in world.live(self.name) if s.have[p]), None)
                if peer is not None and world.swapping:
                    self.sources[p] = peer.name
                elif (
                    self.seeding
                    and p < world.seeded
                    and (not world.stripes_only or p in world.stripe(self.name))
                ):
                    self.sources[p] = "seed"
                else:
                    continue
                self.have[p] = True
                got += 1
                if got == self.per_look:
                    return

    def close(self) -> None:
        self.left = True
        with self.world.lock:
            self.world.dead.add(self.name)  # gone: nobody takes from it any more
