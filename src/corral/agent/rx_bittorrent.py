"""Receiver ``bittorrent``: the image's chunks from a swarm of the session's nodes and
corral's seed, exchanged by libtorrent, unpacked in order as soon as they are complete.

The torrent (made by :mod:`corral.deploy.bittorrent`, handed over base64 in
``plan.transport.params["torrent"]``) is a private, v1, multi-file torrent whose files are
the chunk files of the stream export, ``chunks/00000000.bin`` ..., and whose piece size
divides the chunk size. So chunk *i* is exactly a run of whole pieces
(:class:`PieceMap`): "chunk *i* can be unpacked" is "these pieces are all here", and the
server seeds the export's own files where they lie.

How a node receives (:class:`Feeder`):

- libtorrent downloads into a scratch directory on the *target filesystem*
  (``<target>/.corral-bittorrent``, removed at the end). A node has to keep every piece it
  holds to serve its peers, and the deploy ramdisk's RAM may be smaller than the image's
  stream, while the target disk must hold the unpacked tree anyway: the scratch costs the
  stream's size on it for the time of the transfer. A target with too little room for both
  (checked first) receives by plain HTTP instead.
- The node asks corral's seed only for its *stripe* (every N-th piece, its own 1/N of the
  stream: ``params["stripe"]``), then keeps the seed away and gets the rest from its peers,
  going back to the seed only for pieces no peer can give it (:class:`SeedUse`): that is
  what keeps the server's egress near one copy of the stream. Among the peers, pieces come
  in libtorrent's rarest-first order, except that those of the next :data:`AHEAD_CHUNKS`
  chunks to unpack come first, so the stream is fed to ``zstd -d | tar -x`` nearly as it
  arrives.
- Each chunk, read back through libtorrent (``read_piece``: coherent with its own disk
  cache), is checked against the plan's sha256 before a byte of it is unpacked.
- When the swarm brings no new piece for :data:`STALL_TIMEOUT` seconds (no seed, a dead
  tracker, a server restart), the chunks still missing are fetched over HTTP with
  :meth:`StreamReceiver.fetch_chunk` and handed to libtorrent (``add_piece``) so that the
  node can serve them too; the swarm is used again as soon as it moves.
- Once everything is unpacked the node keeps seeding while it is of use: peers still
  downloading at LAN speed, or members that have not joined yet (corral's tracker counts
  them), for at most :data:`LINGER_MAX` seconds (see :func:`linger`); then it leaves and
  deletes the scratch.

libtorrent is imported lazily: the agent stays stdlib-only (the deploy ramdisk ships
Debian's ``python3-libtorrent``); an agent without it receives by HTTP, saying so in its log.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol

from corral.agent.plan import Plan
from corral.agent.receive import (
    Cancelled,
    HttpReceiver,
    ProgressCallback,
    Received,
    ReceiveError,
    StreamReceiver,
    VerifiedStream,
    chunk_mismatch,
    register,
)
from corral.agent.wire.lan_swarm import lan_settings

log = logging.getLogger("corral.agent")

#: The scratch directory, under the target's mount point.
SCRATCH = ".corral-bittorrent"
#: Room left over on the target beyond the tree and the stream (filesystem metadata, the
#: identity files, the bootloader).
SPACE_MARGIN = 64 << 20
#: The port the agent's libtorrent listens on, on the node's own address. A fixed,
#: well-known one so that a site's firewall can let the swarm through.
PEER_PORT = 6881
#: How long a new torrent may take to check its (empty) save path before pieces are added.
CHECK_WAIT = 5.0
#: Seconds without a new piece after which missing chunks are fetched over HTTP: when
#: neither the peers nor the seed deliver (the seed is down, corral serve restarts). Longer
#: than a tracker announce and several rescues by the seed, shorter than a node's patience.
STALL_TIMEOUT = 15.0
#: Chunks ahead of the unpacking whose pieces get the top priority. One chunk (16 pieces of
#: 256 KiB) keeps the unpacker fed without undoing rarest-first for the rest.
AHEAD_CHUNKS = 1
#: How often the feeding loop looks at the swarm (s): a status call into libtorrent each
#: time, so not too often with a hundred agents on a host.
POLL = 0.2
#: After the last chunk, keep seeding for at most this many seconds (see :func:`linger`):
#: long enough to bridge the gaps between waves of booting nodes (up to 30 s on the
#: virtual cluster with 50 nodes, power-cycled 8 at a time), short enough that a member
#: that never comes does not hold the others long (and corral's tracker stops counting
#: those 3 min into the session). The node's own completion waits for it; the last nodes
#: of a deployment find nobody in need and leave at once.
LINGER_MAX = 60.0
#: Peers downloading at less than this share of the node's own rate do not keep it.
LINGER_SHARE = 0.3
#: Seconds to wait for libtorrent to read back the pieces of one chunk.
READ_TIMEOUT = 30.0
#: Seconds a node may spend getting its stripe from the seed before it turns to its peers
#: anyway (a slow link or a busy seed; its peers will ask the seed for the rest).
STRIPE_TIMEOUT = 10.0
#: Seconds without a new piece after which the node asks the seed for the pieces that at
#: most one peer has (see :class:`SeedUse`). A 256 KiB piece takes 0.1 s at 20 Mbit/s, so
#: two seconds of nothing is trouble, not a pause.
RESCUE_IDLE = 2.0
#: How often a rescue looks whether another peer has the pieces by now.
RESCUE_MAX = 5.0
#: Seconds a node looks at its peers before it asks the seed for its stripe, from the
#: start; it also waits for the tracker's first answer (the connections to the peers it
#: names take a fraction of a second on a LAN)...
LOOK_TIME = 1.0
#: ... for at most this long: without an answer, the node cannot know what its peers have,
#: and asks the seed for nothing but its stripe until then.
TRACKER_WAIT = 15.0
#: Seconds a node with no peer at all waits for some before it asks the seed for pieces.
ALONE_WAIT = 10.0
#: Seconds that pieces may be at no peer before the node asks the seed for them even
#: though other pieces keep coming: the first nodes of a deployment that boots in waves
#: would otherwise wait for the stripes of the last ones.
ORPHAN_WAIT = 5.0


class Swarm(Protocol):
    """What :class:`Feeder` needs of a BitTorrent engine (libtorrent, or a fake)."""

    def pieces(self) -> Sequence[bool]:
        """Which pieces are here and verified."""
        ...

    def downloaded(self) -> int:
        """Bytes of the torrent here and verified."""
        ...

    def read(self, pieces: Sequence[int], timeout: float) -> dict[int, bytes]:
        """The bytes of these pieces (those that could be read within ``timeout``)."""
        ...

    def add(self, pieces: Mapping[int, bytes]) -> None:
        """Pieces that came by another way, to be checked, kept and served."""
        ...

    def prioritize(self, urgent: Sequence[int]) -> None:
        """Fetch these pieces first."""
        ...

    def want(self, pieces: Sequence[int] | None) -> None:
        """Fetch only these pieces (None: all of them, at the normal priority)."""
        ...

    def use_seed(self, on: bool) -> None:
        """Connect to corral's seed, or keep away from it."""
        ...

    def availability(self) -> Sequence[int]:
        """For each piece, how many connected peers have it."""
        ...

    def present(self) -> tuple[int, int]:
        """This node's position among itself and the connected peers that still download
        (by address), and their count."""
        ...

    def peers_in_need(self, min_rate: float) -> int:
        """Connected peers that still want pieces from this node and download at
        ``min_rate`` bytes/s or more (or have no rate measured yet)."""
        ...

    def wait(self, seconds: float) -> None:
        """Sleep until something happens in the swarm, or ``seconds``."""
        ...

    def heard(self) -> bool:
        """Whether the tracker has answered once: before, "no peer has it" means nothing."""
        ...

    def connected(self) -> int:
        """Peers connected (the seed aside, and connections not yet established)."""
        ...


# --- layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PieceMap:
    """Where each chunk of the stream lies in the torrent's pieces.

    The torrent's files are the chunks in order, so the torrent's bytes are the stream's;
    a piece may only straddle two chunks if the piece size does not divide the chunk size
    (corral's own torrents never do that, but the map does not depend on it).
    """

    piece_size: int
    chunk_sizes: tuple[int, ...]
    offsets: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.piece_size <= 0:
            raise ValueError(f"bad piece size {self.piece_size}")
        offsets, at = [], 0
        for size in self.chunk_sizes:
            offsets.append(at)
            at += size
        object.__setattr__(self, "offsets", tuple(offsets))

    @property
    def total(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def num_pieces(self) -> int:
        return -(-self.total // self.piece_size)

    def piece_length(self, piece: int) -> int:
        return min(self.piece_size, self.total - piece * self.piece_size)

    def pieces(self, chunk: int) -> range:
        """The pieces holding any byte of ``chunk``."""
        start = self.offsets[chunk]
        end = start + self.chunk_sizes[chunk]
        if end == start:
            return range(0)
        return range(start // self.piece_size, -(-end // self.piece_size))

    def whole_pieces(self, chunk: int) -> range:
        """The pieces that lie entirely inside ``chunk`` (the ones it alone can fill)."""
        start = self.offsets[chunk]
        end = start + self.chunk_sizes[chunk]
        first = -(-start // self.piece_size)
        last = end // self.piece_size  # exclusive, unless the stream's short last piece
        if end == self.total:
            last = self.num_pieces
        return range(first, max(first, last))

    def chunk_bytes(self, chunk: int, data: Mapping[int, bytes]) -> bytes:
        """Chunk ``chunk`` cut out of its pieces' bytes."""
        span = self.pieces(chunk)
        joined = b"".join(data[p] for p in span)
        skip = self.offsets[chunk] - span.start * self.piece_size if span else 0
        return joined[skip : skip + self.chunk_sizes[chunk]]

    def split(self, chunk: int, data: bytes) -> dict[int, bytes]:
        """The whole pieces of ``chunk`` cut out of its bytes."""
        out = {}
        for piece in self.whole_pieces(chunk):
            start = piece * self.piece_size - self.offsets[chunk]
            out[piece] = data[start : start + self.piece_length(piece)]
        return out


# --- the in-order feed -----------------------------------------------------------------


@dataclass
class FeedStats:
    bytes: int = 0
    from_swarm: int = 0  # chunks
    from_http: int = 0
    mismatched: int = 0  # chunks read from the swarm whose sha256 was not the plan's
    rescues: int = 0  # times the node went back to the seed for pieces no peer had


def stripe(num_pieces: int, index: int, count: int) -> list[int]:
    """The pieces member ``index`` of ``count`` takes from the seed: every count-th one,
    so that the members' first requests to the seed never overlap and the early chunks
    (unpacked first) are spread over all of them."""
    if count <= 0 or not 0 <= index < count:
        return list(range(num_pieces))
    return list(range(index, num_pieces, count))


class SeedUse:
    """When a node talks to corral's seed: the server's egress.

    Left to itself, a node asks the seed for any piece it lacks, because the seed has them
    all and answers fast (its link is usually faster than a node's): the seed then sends
    most pieces many times, as many as it has time for, while the nodes' own uplinks idle.
    So a node takes from the seed only what the swarm cannot give it:

    ``look``
        for :data:`LOOK_TIME`, until the tracker's first answer and a first connection to
        a peer (or four times :data:`LOOK_TIME`), the seed kept away, the node meets its
        peers; if they have its stripe already (it comes late, the others are done and
        seeding), it never asks the seed for anything but rescues;
    ``stripe``
        otherwise its stripe (:func:`stripe`), the 1/N of the pieces nobody else asks the
        seed for, and nothing else (the other pieces are not wanted yet, so no request
        for them can reach the seed); the stripes together are one copy of the stream.
        It ends when the stripe is here, when peers have what is left of it (a node
        that comes late finds the others seeding), after :data:`STRIPE_TIMEOUT` seconds,
        or when the seed sends nothing for twice :data:`RESCUE_IDLE`;
    ``swarm``
        then, the seed blocked (libtorrent's IP filter), every other piece from the peers,
        who hold each other's stripes;
    ``rescue``
        when the node has received nothing for :data:`RESCUE_IDLE` seconds (on a LAN a
        piece takes a fraction of a second), or has lacked pieces that no peer has for
        :data:`ORPHAN_WAIT` seconds, the seed again, for the pieces that at most
        one connected peer has: their stripe's member died before passing it on, is slow,
        or has not come yet. Only those are wanted meanwhile, so the seed sends nothing
        the peers could, and only until they are here or, every :data:`RESCUE_MAX`
        seconds, until a second peer has those still missing. The peers in need (likely
        all lacking the same pieces) share the rescue: each asks for every k-th piece
        by their order of address, and all of them if that has not helped after three
        times :data:`RESCUE_IDLE`. A node that starts long before the others gets most
        of the image this way, unicast: there is nobody to share with yet.

    Without a stripe in the plan (a single node, an older server) the seed stays in use.
    """

    def __init__(
        self,
        swarm: Swarm,
        mine: Sequence[int] | None,
        clock: Callable[[], float],
    ) -> None:
        self.swarm = swarm
        self.clock = clock
        self.started = clock()
        self.mine = list(mine) if mine is not None else None
        self.rescue: list[int] = []
        self.since = 0.0
        self._looked = -1e9
        self._orphans_since = float("inf")
        self._alone_since = float("inf")
        if self.mine is None:
            self.phase = "plain"
        else:
            self.phase = "look" if self.mine else "swarm"
            swarm.use_seed(False)

    def step(self, have: Sequence[bool], idle: float) -> bool:
        """Move on if it is time, given the pieces here and the seconds since the last new
        one; True when the wanted pieces changed (priorities must be set again)."""
        now = self.clock()
        waited = now - self.started
        if self.phase == "look" and (
            (self.swarm.heard() and waited >= LOOK_TIME and self._met(waited))
            or waited >= TRACKER_WAIT
        ):
            assert self.mine is not None
            left = [p for p in self.mine if not have[p]]
            if all(a >= 1 for a in self._available(left)):  # the seed is not connected
                log.info(
                    "bittorrent: my stripe is %s; all from the peers",
                    "at peers already" if left else "here",
                )
                self.phase = "swarm"
                return False
            self.phase, self.started = "stripe", now
            self.swarm.want(left)
            self.swarm.use_seed(True)
            return True
        if self.phase == "stripe":
            assert self.mine is not None
            left = [p for p in self.mine if not have[p]]
            # a latecomer finds nodes that have everything: its stripe is theirs to give
            shared = bool(left) and all(a >= 2 for a in self._available(left))
            late = now - self.started >= STRIPE_TIMEOUT or idle >= 2 * RESCUE_IDLE
            if not left or shared or late:
                log.info(
                    "bittorrent: %s after %.1f s; the rest from the peers",
                    "my stripe is at peers"
                    if shared
                    else "my stripe is late"
                    if left
                    else "my stripe is here",
                    now - self.started,
                )
                self.phase = "swarm"
                self.swarm.use_seed(False)
                self.swarm.want(None)
                return True
        elif (
            self.phase == "swarm"
            and not all(have)
            and (self.swarm.heard() or waited >= TRACKER_WAIT)
            and self._rescue_due(have, idle, now)
        ):
            available = self._counts(len(have))  # the seed is not connected: peers only
            if available is None:
                return False
            missing = [p for p, h in enumerate(have) if not h]
            rare = [p for p in missing if available[p] <= 1]
            # The connected peers that still download lack the same pieces, most likely:
            # each asks the seed for its share only and gets the others' from them. If
            # that has not worked out (they see other peers), all of them.
            position, count = self.swarm.present()
            if idle < 3 * RESCUE_IDLE and count > 1:
                rare = [p for p in rare if p % count == position]
            if not rare:
                return False
            log.info(
                "bittorrent: nothing new for %.0f s; asking the seed for %d pieces "
                "(%d missing, %d at no peer, %d peers in need)",
                idle,
                len(rare),
                len(missing),
                sum(1 for p in missing if not available[p]),
                count,
            )
            self.phase, self.rescue, self.since = "rescue", rare, now
            self._orphans_since = float("inf")  # the others' shares get their time too
            self.swarm.want(rare)  # those only: the seed must not send what peers have
            self.swarm.use_seed(True)
            return True
        elif self.phase == "rescue" and (
            all(have[p] for p in self.rescue) or now - self.since >= RESCUE_MAX
        ):
            available = self._counts(len(have)) or [0] * len(have)  # the seed counts for 1
            rare = [p for p in self.rescue if not have[p] and available[p] <= 2]
            if rare:  # still nobody else to get them from (the peers may have left)
                self.rescue, self.since = rare, now
                self.swarm.want(rare)
                return False
            log.info("bittorrent: back to the peers after %.1f s", now - self.since)
            self.phase = "swarm"
            self.swarm.use_seed(False)
            self.swarm.want(None)
            return True
        return False

    def _met(self, waited: float) -> bool:
        """Connected to a peer, or looked long enough (the first node finds nobody)."""
        return waited >= 4 * LOOK_TIME or self.swarm.connected() > 0

    def _rescue_due(self, have: Sequence[bool], idle: float, now: float) -> bool:
        """Time to ask the seed (looked at once a second): nothing new for
        :data:`RESCUE_IDLE` seconds, or pieces at no peer for :data:`ORPHAN_WAIT` seconds;
        but not while the node has no peer at all, for :data:`ALONE_WAIT` seconds (it is
        still connecting, or the first of its deployment: the others are booting)."""
        if now - self._looked < 1.0:
            return False
        self._looked = now
        if self.swarm.connected() == 0:
            self._alone_since = min(self._alone_since, now)
            if now - self._alone_since < ALONE_WAIT:
                return False
        else:
            self._alone_since = float("inf")
        if idle >= RESCUE_IDLE:
            return True
        available = self._counts(len(have))
        if available is None:
            return False
        if any(not h and not a for h, a in zip(have, available, strict=False)):
            self._orphans_since = min(self._orphans_since, now)
        else:
            self._orphans_since = float("inf")
        return now - self._orphans_since >= ORPHAN_WAIT

    def _available(self, pieces: Sequence[int]) -> list[int]:
        """How many connected sources have each of ``pieces`` (the seed counts for one;
        0 if libtorrent cannot say)."""
        available = self.swarm.availability()
        return [available[p] if p < len(available) else 0 for p in pieces]

    def _counts(self, num_pieces: int) -> list[int] | None:
        """Every piece's count of connected sources; None when libtorrent has none to
        give (it keeps no piece picker for a torrent it considers complete)."""
        available = list(self.swarm.availability())
        return available if len(available) == num_pieces else None


class Feeder:
    """Adds the stream's chunks to ``stream`` in order, each checked, from the swarm or,
    once the swarm stalls, over HTTP (``fetch``).

    It reports the progress itself (``progress``): the pieces the swarm holds count too,
    not only the chunks unpacked."""

    def __init__(
        self,
        stream: VerifiedStream,
        swarm: Swarm,
        layout: PieceMap,
        fetch: Callable[[int, Callable[[int], None]], bytes],
        progress: ProgressCallback,
        cancel: threading.Event,
        *,
        mine: Sequence[int] | None = None,
        stall: float | None = None,
        ahead: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = stream.plan
        self.swarm = swarm
        self.layout = layout
        self.fetch = fetch
        self.progress = progress
        self.cancel = cancel
        self.stall = STALL_TIMEOUT if stall is None else stall
        self.ahead = AHEAD_CHUNKS if ahead is None else ahead
        self.clock = clock
        self.stats = FeedStats()
        self.stream = stream
        stream.progress = lambda _done, _total: self._report()
        self._reported = 0
        self._have = -1
        self._moved = clock()
        self._urgent: list[int] = []
        self.seed = SeedUse(swarm, mine, clock)

    def run(self) -> FeedStats:
        chunks = self.plan.image.chunks
        for index in range(len(chunks)):
            self._urgent = [
                p
                for c in range(index, min(len(chunks), index + max(1, self.ahead)))
                for p in self.layout.pieces(c)
            ]
            self._prioritize()
            self.stream.add(self._next(index))
            self.stats.bytes = self.stream.done
        return self.stats

    def _prioritize(self) -> None:
        """The next chunks' pieces first, unless the node only wants its stripe, or the
        pieces it asks the seed for."""
        if self.ahead > 0 and self.seed.phase not in ("stripe", "rescue"):
            self.swarm.prioritize(self._urgent)

    def _next(self, index: int) -> bytes:
        """Chunk ``index``, checked, waiting for the swarm until it stalls."""
        span = self.layout.pieces(index)
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            have = self.swarm.pieces()
            count = sum(have)
            if count != self._have:
                self._have, self._moved = count, self.clock()
            self._report()
            before = self.seed.phase
            if self.seed.step(have, self.clock() - self._moved):
                self._prioritize()
            if self.seed.phase == "rescue" and before != "rescue":
                self.stats.rescues += 1
            if all(have[p] for p in span):
                data = self._from_swarm(index, span)
                if data is not None:
                    return data
                # wrong bytes from the swarm: the plan's hash wins, over HTTP
                return self._from_http(index)
            if self.clock() - self._moved >= self.stall:
                log.info(
                    "chunk %08d: no new piece for %.0f s, fetching it over HTTP",
                    index,
                    self.clock() - self._moved,
                )
                return self._from_http(index)
            self.swarm.wait(POLL)

    def _from_swarm(self, index: int, span: range) -> bytes | None:
        pieces = self.swarm.read(list(span), READ_TIMEOUT)
        if any(p not in pieces for p in span):
            log.warning("chunk %08d: libtorrent did not read back all its pieces", index)
            return None
        data = self.layout.chunk_bytes(index, pieces)
        wrong = chunk_mismatch(self.plan, index, data)
        if wrong:
            self.stats.mismatched += 1
            log.warning("chunk %08d from the swarm: %s", index, wrong)
            return None
        self.stats.from_swarm += 1
        return data

    def _from_http(self, index: int) -> bytes:
        base = self.stream.done

        def partial(n: int) -> None:
            self._report(base + n)

        data = self.fetch(index, partial)  # checked against the plan by fetch_chunk
        self.stats.from_http += 1
        have = self.swarm.pieces()
        missing = {p: b for p, b in self.layout.split(index, data).items() if not have[p]}
        if missing:
            self.swarm.add(missing)  # so that this node can serve them too
        return data

    def _report(self, at_least: int = 0) -> None:
        total = self.plan.image.stream_size
        done = max(self._reported, self.stream.done, at_least, self.swarm.downloaded())
        self._reported = min(done, total)
        self.progress(self._reported, total)


def linger(
    swarm: Swarm,
    cancel: threading.Event,
    *,
    own_rate: float,
    pending: Callable[[], int] = lambda: 0,
    budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Keep seeding while this node is of use to the swarm, up to ``budget`` seconds
    (:data:`LINGER_MAX`); the time it stayed.

    Of use: a connected peer still wants pieces from it and downloads at LAN speed (at
    least :data:`LINGER_SHARE` of ``own_rate``, this node's own average, or not measured
    yet: it has just come); or members of the session have not joined yet (``pending``,
    asked of corral's tracker every 5 s), since the nodes of a large deployment boot over
    a minute or more, in waves, and each wave would otherwise have to take the whole
    stream from the server again. Every piece this node serves is one the server does not
    send. A slow peer is no reason to stay: the seed serves it (:class:`SeedUse`), and the
    others would all wait for it. Two looks in a row without a reason end it, since a peer
    between two requests may look idle once.
    """
    budget = LINGER_MAX if budget is None else budget
    start = clock()
    idle = 0
    asked, waiting = -1e9, 0
    while clock() - start < budget and not cancel.is_set():
        if clock() - asked >= 5.0:
            asked, waiting = clock(), pending()
        busy = waiting > 0 or swarm.peers_in_need(LINGER_SHARE * own_rate) > 0
        idle = 0 if busy else idle + 1
        if idle >= 2:
            break
        swarm.wait(min(0.5, max(0.0, budget - (clock() - start))))
    return clock() - start


def tracker_pending(tracker: str, info_hash: str) -> Callable[[], int]:
    """Ask corral's tracker how many members have not joined yet (0 if it cannot say)."""
    url = tracker.rsplit("/", 1)[0] + f"/pending/{info_hash}"

    def pending() -> int:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return int(json.load(answer).get("pending", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    return pending


# --- libtorrent ------------------------------------------------------------------------


def session_settings(lt: Any, address: str, port: int = PEER_PORT) -> dict[str, Any]:
    """The agent's libtorrent settings: :func:`lan_settings` and what a node adds."""
    return {
        **lan_settings(lt, address, port),
        # the node's own address only: a deploy ramdisk may have several NICs up
        "outgoing_interfaces": address if address != "0.0.0.0" else "",
        "user_agent": "corral-agent",
        # the seed is kept away with the IP filter (see SeedUse); the tracker on the same
        # host must stay reachable
        "apply_ip_filter_to_trackers": False,
        # a node that has its stripe and wants nothing else yet is "finished" for a moment,
        # and libtorrent would drop its connections to seeds and to other finished nodes;
        # its peers would reconnect seconds later. Nodes leave the swarm on their own.
        "close_redundant_connections": False,
        "connections_limit": 200,
        # the backlog of a listening socket (libtorrent's default: 5) overflows when a
        # wave of nodes connects to every peer at once
        "listen_queue_size": 200,
        # corral serve answers announces from a thread beside a hundred nodes' reports:
        # give it time rather than retry later (a failed announce waits 10 s or more)
        "tracker_completion_timeout": 30,
        "tracker_receive_timeout": 15,
        # a node runs its installer beside libtorrent on a small machine: few threads
        "aio_threads": 2,
        "hashing_threads": 1,
        "alert_mask": int(
            lt.alert.category_t.error_notification
            | lt.alert.category_t.status_notification
            | lt.alert.category_t.storage_notification
            | lt.alert.category_t.tracker_notification
        ),
    }


class LibtorrentSwarm:
    """A libtorrent session with the one torrent, downloading into ``save_path``."""

    def __init__(
        self,
        lt: ModuleType,
        torrent: bytes,
        save_path: Path,
        address: str,
        port: int = PEER_PORT,
        seed: tuple[str, int] | None = None,
    ) -> None:
        self.lt = lt
        self.seed = seed
        self.address = address
        try:
            info = lt.torrent_info(lt.bdecode(torrent))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ReceiveError(
                f"transport bittorrent: the plan's torrent is unreadable: {exc}"
            ) from None
        self.piece_size = int(info.piece_length())
        self.num_files = int(info.num_files())
        self.session = lt.session(session_settings(lt, address, port), 0)  # no plugins
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(save_path)
        flags = lt.torrent_flags
        params.flags = (
            params.flags & ~flags.auto_managed & ~flags.paused
        ) | (flags.disable_dht | flags.disable_lsd | flags.disable_pex)  # fmt: skip
        self.handle = self.session.add_torrent(params)
        self._reads: dict[int, bytes] = {}
        self._warned: set[str] = set()
        self._heard = False
        self._described = 0.0
        self._checked(CHECK_WAIT)

    def _checked(self, timeout: float) -> None:
        """Wait, at most ``timeout`` s, for libtorrent to check the (empty) save path:
        until then it drops ``add_piece`` without a word (seen with 2.0.8 and 2.1.1), and
        the node could not share what it took over HTTP."""
        states = self.lt.torrent_status.states
        checking = (states.checking_files, states.checking_resume_data)
        deadline = time.monotonic() + timeout
        while self.handle.status(0).state in checking and time.monotonic() < deadline:
            time.sleep(0.02)

    def pieces(self) -> Sequence[bool]:
        return list(self.handle.status(self.lt.status_flags_t.query_pieces).pieces)

    def downloaded(self) -> int:
        return int(self.handle.status(0).total_wanted_done)

    def read(self, pieces: Sequence[int], timeout: float) -> dict[int, bytes]:
        wanted = set(pieces)
        for piece in wanted - set(self._reads):
            self.handle.read_piece(piece)
        deadline = time.monotonic() + timeout
        while not wanted <= set(self._reads) and time.monotonic() < deadline:
            self.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        out = {p: self._reads.pop(p) for p in wanted if p in self._reads}
        self._reads.clear()  # late answers of an earlier chunk are of no use
        return out

    def add(self, pieces: Mapping[int, bytes]) -> None:
        for piece, data in pieces.items():
            self.handle.add_piece(piece, data, 0)

    def prioritize(self, urgent: Sequence[int]) -> None:
        self.handle.prioritize_pieces([(p, 7) for p in urgent])

    def want(self, pieces: Sequence[int] | None) -> None:
        count = len(self.pieces())
        if pieces is None:
            self.handle.prioritize_pieces([4] * count)
        else:
            wanted = set(pieces)
            self.handle.prioritize_pieces([4 if p in wanted else 0 for p in range(count)])

    def use_seed(self, on: bool) -> None:
        if self.seed is None:
            return
        rules = self.lt.ip_filter()
        if not on:
            rules.add_rule(self.seed[0], self.seed[0], 1)  # 1: blocked
        self.session.set_ip_filter(rules)  # disconnects the seed at once
        if on:
            self.handle.connect_peer(self.seed)

    def availability(self) -> Sequence[int]:
        return list(self.handle.piece_availability())

    def heard(self) -> bool:
        return self._heard

    def connected(self) -> int:
        flags = self.lt.peer_info
        pending = flags.connecting | flags.handshake
        seed = self.seed[0] if self.seed else ""
        return sum(
            1
            for peer in self.handle.get_peer_info()
            if not peer.flags & pending and str(peer.ip[0]) != seed
        )

    def present(self) -> tuple[int, int]:
        flags = self.lt.peer_info
        peers = self.handle.get_peer_info()
        log.debug(
            "bittorrent: %d peers: %d seeds, %d connecting, %d in handshake",
            len(peers),
            sum(1 for p in peers if p.flags & flags.seed),
            sum(1 for p in peers if p.flags & flags.connecting),
            sum(1 for p in peers if p.flags & flags.handshake),
        )
        others = {
            str(peer.ip[0])
            for peer in peers
            if not peer.flags & (flags.seed | flags.connecting | flags.handshake)
        }
        everyone = sorted(others | {self.address}, key=_address_key)
        return everyone.index(self.address), len(everyone)

    def peers_in_need(self, min_rate: float) -> int:
        flags = self.lt.peer_info
        peers = self.handle.get_peer_info()
        if time.monotonic() - self._described >= 10:
            self._described = time.monotonic()
            log.debug(
                "bittorrent: seeding to %d peers (%d incoming, %d connecting, %d seeds)",
                len(peers),
                sum(1 for p in peers if not p.flags & flags.local_connection),
                sum(1 for p in peers if p.flags & flags.connecting),
                sum(1 for p in peers if p.flags & flags.seed),
            )
        return sum(
            1
            for peer in peers
            if peer.flags & flags.remote_interested
            and not peer.flags & flags.seed
            and (peer.remote_dl_rate == 0 or peer.remote_dl_rate >= min_rate)
        )

    def wait(self, seconds: float) -> None:
        if self.session.wait_for_alert(int(seconds * 1000)) is None:
            return
        for alert in self.session.pop_alerts():
            self._alert(alert)

    def _alert(self, alert: Any) -> None:
        lt = self.lt
        if isinstance(alert, lt.tracker_reply_alert):
            if not self._heard:
                log.info("bittorrent: the tracker names %d peers", alert.num_peers)
            self._heard = True
        elif isinstance(alert, lt.read_piece_alert):
            if alert.error.value():
                log.warning("libtorrent could not read piece %d: %s", alert.piece, alert.message())
            else:
                self._reads[int(alert.piece)] = bytes(alert.buffer)
        elif isinstance(alert, lt.tracker_error_alert | lt.listen_failed_alert) or (
            alert.category() & lt.alert.category_t.error_notification
        ):
            self._once(type(alert).__name__, alert.message())

    def _once(self, kind: str, message: str) -> None:
        """Log a kind of trouble once (a tracker down is retried every few seconds)."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("libtorrent: %s", message)

    def close(self) -> None:
        """Leave the swarm (telling the tracker) and drop the downloaded files."""
        try:
            self.session.remove_torrent(self.handle, self.lt.session.delete_files)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                alert = self.session.wait_for_alert(200)
                done = alert is not None and any(
                    isinstance(
                        a, self.lt.torrent_deleted_alert | self.lt.torrent_delete_failed_alert
                    )
                    for a in self.session.pop_alerts()
                )
                if done:
                    break
        finally:
            del self.handle
            del self.session  # joins libtorrent's threads (the tracker gets 1 s)


def local_address(host: str, port: int) -> str:
    """The address this machine reaches ``host`` from: the node's own on its boot NIC.

    A UDP "connection" sends nothing; it only asks the kernel for the route.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
        except OSError:
            return "0.0.0.0"


# --- the receiver ----------------------------------------------------------------------


def _address_key(address: str) -> tuple[int, str]:
    """Sort addresses as numbers where they are IPv4 (every node must sort alike)."""
    try:
        return int.from_bytes(socket.inet_aton(address), "big"), address
    except OSError:
        return -1, address


def _endpoint(text: str) -> tuple[str, int] | None:
    """``host:port`` as (IPv4 address, port); None if empty or unresolvable."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        return socket.gethostbyname(host), int(port)
    except OSError:
        log.warning("cannot resolve the seed's address %s: using it like any peer", host)
        return None


def _stripe(value: Any, num_pieces: int) -> list[int] | None:
    """This node's stripe from the plan's ``[index, count]``; None if there is none."""
    try:
        index, count = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    if count < 2 or not 0 <= index < count:
        return None  # a lone node: everything from the seed
    return stripe(num_pieces, index, count)


def _import_libtorrent() -> ModuleType | None:
    try:
        return importlib.import_module("libtorrent")
    except ImportError as exc:
        log.warning("libtorrent is not available (%s)", exc)
        return None


@register
class BitTorrentReceiver(StreamReceiver):
    """The stream's chunks from the swarm, checked and unpacked in order."""

    name = "bittorrent"

    #: the port to listen on (0: any, for tests that run several agents on one address)
    port: ClassVar[int] = PEER_PORT
    #: the address to use ("": the one the node reaches corral's server from)
    address: ClassVar[str] = ""
    #: the engine, replaced by the tests
    engine: Callable[[], ModuleType | None] = staticmethod(_import_libtorrent)

    def receive(
        self,
        plan: Plan,
        target_dir: Path,
        progress_callback: ProgressCallback,
        cancel_event: threading.Event,
    ) -> Received:
        why = self._no_swarm(plan, target_dir)
        lt = None if why else self.engine()
        if why or lt is None:
            log.warning("transport bittorrent: %s; receiving over HTTP", why or "no libtorrent")
            http = HttpReceiver(self.context)
            return http.receive(plan, target_dir, progress_callback, cancel_event)
        refetched = len(self.refetched)
        client = self.context.client
        address = self.address or (local_address(client.host, client.port) if client else "")
        params = plan.transport.params
        seed = _endpoint(str(params.get("seed", "")))
        scratch = target_dir / SCRATCH
        shutil.rmtree(scratch, ignore_errors=True)  # a previous attempt's
        scratch.mkdir(mode=0o700)
        torrent = base64.b64decode(str(params["torrent"]))
        started = time.monotonic()
        swarm: LibtorrentSwarm | None = None
        try:
            swarm = live = LibtorrentSwarm(
                lt, torrent, scratch, address or "0.0.0.0", self.port, seed
            )
            layout = self._layout(plan, swarm)
            mine = _stripe(params.get("stripe"), layout.num_pieces) if seed else None
            log.info(
                "bittorrent: %d pieces of %d KiB on %s:%d, tracker %s, seed %s, my stripe %s",
                layout.num_pieces,
                layout.piece_size >> 10,
                address,
                swarm.session.listen_port(),
                params.get("tracker", "?"),
                params.get("seed", "?"),
                "none" if mine is None else f"{len(mine)} pieces",
            )

            def fetch(index: int, partial: Callable[[int], None]) -> bytes:
                if client is None:
                    raise ReceiveError("transport bittorrent: no server to fetch chunks from")
                return self.fetch_chunk(client, plan, index, partial, cancel_event)

            feeds: list[FeedStats] = []

            def fill(stream: VerifiedStream) -> None:
                feeder = Feeder(
                    stream, live, layout, fetch, progress_callback, cancel_event, mine=mine
                )
                feeds.append(feeder.run())

            self.unpack(plan, target_dir, progress_callback, cancel_event, fill)
            stats = feeds[0]
            elapsed = time.monotonic() - started
            stayed = linger(
                swarm,
                cancel_event,
                own_rate=plan.image.stream_size / max(elapsed, 0.1),
                pending=tracker_pending(
                    str(params.get("tracker", "")), str(params.get("info_hash", ""))
                ),
            )
        finally:
            try:
                if swarm is not None:
                    swarm.close()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        log.info(
            "received %s by bittorrent: %d chunks from the swarm, %d over HTTP "
            "(%d mismatched), %d rescues by the seed, in %.1f s, then seeded %.1f s more",
            plan.image.ref,
            stats.from_swarm,
            stats.from_http,
            stats.mismatched,
            stats.rescues,
            elapsed,
            stayed,
        )
        return Received(
            stats.bytes,
            {
                "chunks": len(plan.image.chunks),
                "swarm": stats.from_swarm,
                "http": stats.from_http,
                "mismatched": stats.mismatched,
                "rescues": stats.rescues,
                "refetched": len(self.refetched) - refetched,
            },
        )

    @staticmethod
    def _no_swarm(plan: Plan, target_dir: Path) -> str:
        """Why this node cannot join the swarm ("" if it can)."""
        if not plan.transport.params.get("torrent"):
            return "the plan has no torrent (the session had not started on the server)"
        need = plan.image.tree_bytes + plan.image.stream_size + SPACE_MARGIN
        free = shutil.disk_usage(target_dir).free
        if free < need:
            return (
                f"the target has {free >> 20} MiB free, the tree and a scratch copy of the "
                f"stream need {need >> 20} MiB"
            )
        return ""

    @staticmethod
    def _layout(plan: Plan, swarm: LibtorrentSwarm) -> PieceMap:
        layout = PieceMap(swarm.piece_size, tuple(c.size for c in plan.image.chunks))
        if swarm.num_files != len(plan.image.chunks) or layout.total != plan.image.stream_size:
            raise ReceiveError(
                f"transport bittorrent: the torrent has {swarm.num_files} files, the plan's "
                f"image {plan.image.ref} {len(plan.image.chunks)} chunks"
            )
        return layout
