"""The ``bittorrent`` transport: corral seeds the image's stream to a swarm of the session's
nodes, which exchange pieces among themselves, so the server sends about one copy.

What a session is made of (:meth:`BitTorrentTransport.start`):

- **The torrent.** A private, v1, multi-file torrent whose files are the stream export's
  chunk files (``chunks/00000000.bin`` ...), named ``chunks`` so that libtorrent, with
  ``save_path`` the version's ``exports`` directory, seeds the files where they lie: no copy
  of the image is made, and a node sees chunk boundaries as file boundaries. A single file
  (the chunks concatenated) would have needed that copy on the server. The piece size
  (:func:`piece_size_for`) divides the chunk size, so every chunk is a run of whole pieces
  and a node knows exactly which pieces it needs before it can check and unpack the next
  chunk. The info dictionary carries ``source = "corral deployment D image NAME:V"``: each
  deployment has its own info-hash, so the torrent and its swarm are private to the
  deployment, and the same deployment gets the same torrent again after a restart of
  corral serve (the torrent is built deterministically from the files, no creation date).
- **The tracker** (:class:`~corral.deploy.transports.bittorrent_tracker.Tracker`, in a
  module of its own): a tiny HTTP tracker on its own port
  (:data:`TRACKER_PORT`), stdlib ``http.server`` in a thread of corral serve. It answers
  only for the info-hashes of running sessions, and only to the session's members' addresses
  (and the server's own); anything else gets a ``failure reason``. Embedding it keeps the
  deployment self-contained (no opentracker to install, configure and supervise), and it
  only has to know a few hundred peers.
- **The seed** (:class:`Seeder`): one libtorrent session, seeding every session's torrent
  in ``seed_mode`` (the export was checked against its manifest by :meth:`prepare`, so
  libtorrent need not read it all before serving). It runs in a child process of corral
  serve that serve supervises
  (:class:`~corral.deploy.transports.bittorrent_seed.SeedProcess`), so that the API never
  waits on libtorrent, and a seed that dies or hangs is started again.

A node's plan (:meth:`params`) holds the torrent (base64), the tracker's URL, the seed's
address, the node's *stripe* (its position among the session's nodes: it takes every N-th
piece from the seed and the rest from its peers, so that the seed sends about one copy;
see :class:`corral.agent.receivers.bittorrent.seed.SeedUse`), its rack, the rack's
addresses and its *lane* (the ``rack`` variable: the stripes of other racks the node
brings into its own, from the nodes there that hold them, before it trades with its own
rack only; see :func:`~corral.deploy.transports.bittorrent_tracker.lanes`) and the HTTP
base of the chunks, which the agent falls back on for chunks the swarm does not deliver. The tracker
also tells the nodes which members have not joined yet or have just come
(``/pending/INFOHASH``), so that the nodes there leave those members' stripes to them,
and the nodes done first keep seeding for those still booting.
:meth:`finish` removes the torrent from the seed and the tracker; the last one stops both.
The agent's side is :mod:`corral.agent.receivers.bittorrent`.

Knobs that are module constants (a site should not need them, so they are not settings):
:data:`TRACKER_PORT`, :data:`SEED_PORT`, the tracker's ``ANNOUNCE_INTERVAL`` and
``MAX_PEERS``, and the piece sizes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import itertools
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from corral.agent.wire.bencode import bencode
from corral.agent.wire.lan_swarm import lan_settings, limit_local_peers
from corral.config import Settings
from corral.deploy.transports.base import Member, Meter, NotReady
from corral.deploy.transports.bittorrent_seed import SeedProcess
from corral.deploy.transports.bittorrent_tracker import Tracker, lanes, partners
from corral.errors import ConfigError
from corral.images.exports import Chunked

log = logging.getLogger("corral.deploy")

#: The tracker's port, on corral serve's address.
TRACKER_PORT = 6969
#: The seed's listening port (the agents use
#: :data:`corral.agent.receivers.bittorrent.libtorrent_swarm.PEER_PORT`).
SEED_PORT = 6881

#: Piece sizes (see :func:`piece_size_for`).
MIN_PIECE = 256 << 10
MAX_PIECE = 4 << 20
TARGET_PIECES = 1024
#: The torrent's top directory: the name of the export's chunk directory.
TORRENT_NAME = "chunks"


def piece_size_for(stream_size: int, chunk_size: int) -> int:
    """The piece size of an image's torrent: the smallest power of two from
    :data:`MIN_PIECE` that keeps the piece count near :data:`TARGET_PIECES`, at most
    :data:`MAX_PIECE`, and dividing ``chunk_size``.

    Why small pieces on a LAN: a peer passes on a piece only once it is whole and verified,
    so the piece is the swarm's pipelining unit; at 256 KiB a node re-shares what it got
    from the seed 0.1 s later on a 20 Mbit/s link (2 ms at 1 Gbit/s), and a 64 MiB stream
    has 256 pieces, more than the nodes of a large session, so the seed's first round gives
    them different pieces. Why not smaller: each piece costs 20 bytes in the torrent, which
    every plan carries, a HAVE message to every connected peer and piece-picker work, and
    libtorrent requests 16 KiB blocks regardless. About a thousand pieces keeps the torrent
    near 20 KiB; beyond 256 MiB the pieces grow instead (1 GiB: 1 MiB pieces, 4 GiB: 4 MiB).
    Dividing the chunk size makes each chunk a run of whole pieces, so the agent knows
    exactly which pieces complete the next chunk to unpack.
    """
    size = MIN_PIECE
    while size < MAX_PIECE and stream_size > size * TARGET_PIECES:
        size *= 2
    while size > 16 << 10 and chunk_size % size:
        size //= 2  # a chunk size that is no multiple of a power of two this large
    return size


def piece_hashes(paths: Iterable[Path], piece_size: int) -> bytes:
    """The SHA-1 of each ``piece_size`` bytes of the files read one after the other."""
    out: list[bytes] = []
    digest = hashlib.sha1()
    filled = 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                view = memoryview(block)
                while view:
                    take = min(len(view), piece_size - filled)
                    digest.update(view[:take])
                    filled += take
                    view = view[take:]
                    if filled == piece_size:
                        out.append(digest.digest())
                        digest, filled = hashlib.sha1(), 0
    if filled:
        out.append(digest.digest())
    return b"".join(out)


@dataclass(frozen=True)
class Layout:
    """An image version's stream as torrent files and pieces (the same for every session)."""

    files: tuple[tuple[str, int], ...]  # (file name under TORRENT_NAME, size)
    piece_size: int
    hashes: bytes


def stream_layout(payload: Chunked) -> Layout:
    """Read the export's index and hash its chunk files into pieces."""
    index = payload.index()
    size, chunk_size, count = int(index["size"]), int(index["chunk_size"]), len(index["chunks"])
    paths = [payload.chunk_path(i) for i in range(count)]
    files = tuple(
        (path.name, min(chunk_size, size - i * chunk_size)) for i, path in enumerate(paths)
    )
    piece = piece_size_for(size, chunk_size)
    return Layout(files, piece, piece_hashes(paths, piece))


@dataclass(frozen=True)
class Torrent:
    data: bytes  # the .torrent file
    info_hash: bytes  # SHA-1 of its bencoded info dictionary


def make_torrent(layout: Layout, tracker: str, source: str) -> Torrent:
    """The .torrent of ``layout``: private, announcing to ``tracker``, deterministic (no
    creation date), ``source`` in the info dictionary to make its info-hash unique."""
    info = {
        "name": TORRENT_NAME,
        "piece length": layout.piece_size,
        "pieces": layout.hashes,
        "private": 1,
        "source": source,
        "files": [{"length": size, "path": [name]} for name, size in layout.files],
    }
    data = bencode({"announce": tracker, "created by": "corral", "info": info})
    return Torrent(data, hashlib.sha1(bencode(info)).digest())


# --- the tracker -----------------------------------------------------------------------


# --- the seed --------------------------------------------------------------------------


def seed_settings(lt: Any, address: str, port: int) -> dict[str, Any]:
    """libtorrent settings of corral's seed: the LAN choices it shares with the agents
    (:func:`corral.agent.wire.lan_swarm.lan_settings`, which says why) and its own."""
    return {
        **lan_settings(lt, address, port),
        "user_agent": "corral",
        # Hundreds of nodes may connect to the seed, every node of a session at once: a
        # deep listen backlog (libtorrent's default is 5).
        "connections_limit": 1000,
        "listen_queue_size": 1000,
        # The seed never dials: a node connects to it when it wants it, and keeps it away
        # otherwise (libtorrent's IP filter, see the agent). A node that had been connected
        # stayed in the seed's list of peers, and the seed dialled it again every
        # min_reconnect_time (2 s) for as long as the deployment ran, to be refused: at
        # N = 100, 9,000 connection attempts in a run, 0.09 x S of the server's egress
        # (handshakes, SYNs and resets); at 10,000 nodes, 100 a second, the most the
        # shared setting allows.
        "connection_speed": 0,
        # the seed reads a disk that serves many peers: more I/O threads than a node's
        "aio_threads": 4,
        "alert_mask": int(lt.alert.category_t.error_notification),
    }


class Seeder:
    """One libtorrent session seeding the sessions' torrents in place (in the seed's own
    process: see :mod:`corral.deploy.transports.bittorrent_seed`)."""

    def __init__(self, lt: ModuleType, address: str, port: int) -> None:
        self.lt = lt
        self.session = lt.session(seed_settings(lt, address, port), 0)  # no plugins
        limit_local_peers(self.session)  # the settings stay the truth on a LAN
        deadline = time.monotonic() + 2
        while not self.session.is_listening() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.session.is_listening():
            raise ConfigError(
                f"the BitTorrent seed cannot listen on {address}:{port}",
                f"free port {port} or use another transport",
            )
        self.port = int(self.session.listen_port())
        self.handles: dict[bytes, Any] = {}
        log.info("BitTorrent seed on %s:%d", address, self.port)

    def add(self, torrent: Torrent, save_path: Path) -> None:
        key = torrent.info_hash
        if key in self.handles:
            return
        lt = self.lt
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(lt.bdecode(torrent.data))
        params.save_path = str(save_path)
        flags = lt.torrent_flags
        params.flags = (
            (params.flags & ~flags.auto_managed & ~flags.paused)
            | flags.seed_mode  # checked by prepare(): serve without reading it all first
            | flags.disable_dht
            | flags.disable_lsd
            | flags.disable_pex
        )
        self.handles[key] = self.session.add_torrent(params)

    def remove(self, key: bytes) -> None:
        handle = self.handles.pop(key, None)
        if handle is not None:
            self.session.remove_torrent(handle)  # never delete_files: they are the image

    def uploaded(self, key: bytes) -> int:
        handle = self.handles.get(key)
        return int(handle.status(0).total_payload_upload) if handle is not None else 0

    def errors(self) -> list[str]:
        error = self.lt.alert.category_t.error_notification
        return [a.message() for a in self.session.pop_alerts() if a.category() & error]

    def close(self) -> None:
        for key in list(self.handles):
            self.remove(key)
        del self.session  # joins libtorrent's threads


def import_libtorrent() -> ModuleType:
    try:
        return importlib.import_module("libtorrent")
    except ImportError as exc:
        raise ConfigError(
            f"the bittorrent transport needs libtorrent: {exc}",
            "install corral's dependencies again (libtorrent is on PyPI)",
        ) from None


# --- the transport ---------------------------------------------------------------------


@dataclass
class _Session:
    deployment: int
    ref: str
    torrent: Torrent
    nodes: tuple[str, ...]  # a node's stripe is its position (by_stripe)
    racks: dict[str, str]  # a node -> its rack, for the nodes in one
    addresses: dict[str, str]  # a node -> its address, for the nodes whose is known
    lanes: dict[str, list[int]] = field(default_factory=dict)  # see bittorrent_tracker.lanes
    partners: dict[str, frozenset[str]] = field(default_factory=dict)  # and .partners


def by_stripe(nodes: Iterable[str], racks: Mapping[str, str]) -> tuple[str, ...]:
    """The session's nodes in the order of their stripes: by name, the racks taking turns
    (a node of each rack, then the second of each, ...; the nodes in no rack as one more
    rack). A torrent rarely has a multiple of N pieces, and some stripes then hold a
    piece more (120 pieces, 100 nodes: 20 stripes hold two): the agent spreads those over
    the turns and the racks (``stripe_turn`` in the plan, see
    :func:`~corral.agent.receivers.bittorrent.swarm.spare_stripes`), so that each rack
    holds its share of the image and sends about as much across its uplink as the others
    (in order of names, the first rack of four held 0.375 x S, and sent 1.22 x S out in a
    run of the unfinished branch), and its nodes bring in lanes of about one size."""
    groups: dict[str, list[str]] = {}
    for node in sorted(nodes):
        groups.setdefault(racks.get(node, ""), []).append(node)
    turns = itertools.zip_longest(*(groups[r] for r in sorted(groups)))
    return tuple(node for turn in turns for node in turn if node is not None)


class BitTorrentTransport:
    """corral's seed and tracker for the BitTorrent sessions of its deployments."""

    name = "bittorrent"
    export = "stream"

    def __init__(
        self,
        settings: Settings,
        *,
        tracker_port: int = TRACKER_PORT,
        seed_port: int = SEED_PORT,
    ) -> None:
        self.server = settings.server_url.rstrip("/")
        self.host = urllib.parse.urlsplit(settings.server_url).hostname or "localhost"
        self.address = settings.address or "0.0.0.0"
        self.tracker_port = tracker_port
        self.seed_port = seed_port
        self.layouts: dict[str, Layout] = {}
        self.sessions: dict[tuple[int, str], _Session] = {}
        self.tracker: Tracker | None = None
        self.seeder: SeedProcess | None = None
        #: what the seed uploaded in the sessions that ended
        self.meter = Meter()
        self._lock = threading.RLock()

    @property
    def tracker_url(self) -> str:
        port = self.tracker.port if self.tracker else self.tracker_port
        return f"http://{self.host}:{port}/announce"

    def prepare(self, payload: Chunked) -> None:
        """Check the export against its manifest and hash it into pieces, once per export."""
        with self._lock:
            if payload.ref not in self.layouts:
                started = time.monotonic()
                payload.verify()
                self.layouts[payload.ref] = layout = stream_layout(payload)
                log.info(
                    "bittorrent: %s is %d pieces of %d KiB (hashed in %.1f s)",
                    payload.ref,
                    len(layout.hashes) // 20,
                    layout.piece_size >> 10,
                    time.monotonic() - started,
                )

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None:
        """Make the session's torrent, admit its members at the tracker and seed it."""
        self.prepare(payload)
        with self._lock:
            if self.tracker is None:
                self.tracker = Tracker(self.address, self.tracker_port)
            if self.seeder is None:
                self.seeder = SeedProcess(self.address, self.seed_port)
            source = f"corral deployment {deployment} image {payload.ref}"
            torrent = make_torrent(self.layouts[payload.ref], self.tracker_url, source)
            racks = {m.node: m.rack for m in members if m.rack}
            session = _Session(
                deployment,
                payload.ref,
                torrent,
                by_stripe({m.node for m in members}, racks),
                racks,
                {m.node: str(m.ip) for m in members if m.ip},
            )
            session.lanes = lanes(session.nodes, racks)
            session.partners = partners(session.nodes, session.lanes, racks)
            self.sessions[(deployment, payload.ref)] = session
            self.tracker.swarms.open(
                session.torrent.info_hash,
                self._admitted(members),
                [session.addresses.get(node, "") for node in session.nodes],
                self._servers(),
                racks={str(m.ip): m.rack for m in members if m.ip and m.rack},
            )
            self.seeder.add(torrent, payload.directory)
            log.info(
                "bittorrent: deployment %d seeds %s to %d node(s), info-hash %s",
                deployment,
                payload.ref,
                len(members),
                session.torrent.info_hash.hex(),
            )

    def _admitted(self, members: Sequence[Member]) -> set[str] | None:
        """The addresses the tracker answers: the members' and the server's own; None (any
        address) if a member's address is not known (a node on DHCP)."""
        if any(not m.ip for m in members):
            return None
        return {str(m.ip) for m in members} | self._servers()

    def _servers(self) -> set[str]:
        """The addresses corral's seed may announce from."""
        addresses = {"127.0.0.1"}
        if self.address not in ("", "0.0.0.0"):
            addresses.add(self.address)
        with contextlib.suppress(OSError):
            addresses |= {str(a[4][0]) for a in socket.getaddrinfo(self.host, None, socket.AF_INET)}
        return addresses

    def params(self, payload: Chunked, node: str) -> dict[str, Any]:
        """The node's torrent, tracker, seed, stripe and rack. :class:`NotReady` while no
        session of ``payload`` is started: a node powered on by someone else (a skewed
        start, a restart of corral serve) can ask before the manager's next pass starts
        it, and waits for it rather than take the whole image over HTTP (as three nodes
        of 300 did at a start skew of 30 s, before)."""
        base = f"{self.server}{payload.url_path}"
        with self._lock:
            sessions = [s for s in self.sessions.values() if s.ref == payload.ref]
            mine = [s for s in sessions if node in s.nodes] or sessions[-1:]
        if not mine:
            raise NotReady(
                f"no BitTorrent session for {payload.ref} with node {node} yet",
                "the deploy manager starts sessions every second: the agent asks again",
            )
        session = mine[-1]
        params: dict[str, Any] = {
            "torrent": base64.b64encode(session.torrent.data).decode("ascii"),
            "tracker": self.tracker_url,
            "info_hash": session.torrent.info_hash.hex(),
            "base": base,
        }
        if self.seeder is not None:
            params["seed"] = f"{self.seed_host}:{self.seeder.port}"
        if node in session.nodes:
            params["stripe"] = [session.nodes.index(node), len(session.nodes)]
            if session.racks:
                # the turns in which by_stripe deals the stripes to the racks: the agent
                # spreads the spare pieces over them (swarm.spare_stripes)
                params["stripe_turn"] = len({session.racks.get(n, "") for n in session.nodes})
        rack = session.racks.get(node)
        if rack is not None:
            params["rack"] = rack
            params["lane"] = session.lanes.get(node, [])
            params["lane_peers"] = sorted(
                session.addresses[n]
                for n in session.partners.get(node, ())
                if n in session.addresses
            )
            params["rack_peers"] = sorted(
                session.addresses[n]
                for n, r in session.racks.items()
                if r == rack and n in session.addresses
            )
        return params

    @property
    def seed_host(self) -> str:
        """Where the nodes reach the seed: corral's address, or its URL's host."""
        return self.address if self.address not in ("", "0.0.0.0") else self.host

    def finish(self, deployment: int, payload: Chunked) -> None:
        with self._lock:
            session = self.sessions.pop((deployment, payload.ref), None)
            if session is None:
                return
            self._drop(session, "done")
            if not self.sessions:
                self._stop()

    def sent(self) -> dict[str, int]:
        """What corral's seed uploaded to the swarms (the nodes trade the rest)."""
        with self._lock:
            seeder = self.seeder
            live = [
                (s.ref, seeder.uploaded(s.torrent.info_hash))
                for s in self.sessions.values()
                if seeder is not None
            ]
            return self.meter.read(*live)

    def close(self) -> None:
        with self._lock:
            for session in self.sessions.values():
                self._drop(session, "stopped with corral serve")
            self.sessions.clear()
            self._stop()

    def _drop(self, session: _Session, why: str) -> None:
        """Stop seeding a session's torrent and answering for it."""
        key = session.torrent.info_hash
        if self.seeder is not None:
            uploaded = self.seeder.uploaded(key)
            self.meter.add(session.ref, uploaded)
            size = sum(size for _, size in self.layouts[session.ref].files)
            log.info(
                "bittorrent: deployment %d, %s: %s; the seed sent %d bytes (%.2f x the stream)",
                session.deployment,
                session.ref,
                why,
                uploaded,
                uploaded / max(1, size),
            )
            self.seeder.remove(key)
        if self.tracker is not None:
            self.tracker.swarms.close(key)

    def _stop(self) -> None:
        if self.seeder is not None:
            for message in self.seeder.errors():
                log.warning("bittorrent seed: %s", message)
            self.seeder.close()
            self.seeder = None
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker = None
