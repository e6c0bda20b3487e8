"""The in-order feed (:class:`Feeder`): the stream's chunks from the swarm, checked, or
over HTTP once it stalls; and the seeding after it (:func:`linger`)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from corral.agent.errors import Cancelled
from corral.agent.receivers.bittorrent.seed import SeedUse
from corral.agent.receivers.bittorrent.swarm import PieceMap, Swarm, stripe
from corral.agent.receivers.stream import ProgressCallback, VerifiedStream, chunk_mismatch

log = logging.getLogger("corral.agent")

#: Seconds without a new piece after which missing chunks are fetched over HTTP: when
#: neither the peers nor the seed deliver (the seed is down, corral serve restarts). Longer
#: than a tracker announce and several rescues by the seed, shorter than a node's patience.
STALL_TIMEOUT = 15.0
#: ... or for this many pieces' time at the node's measured pace, if that is longer.
STALL_PIECES = 15
#: Chunks ahead of the unpacking whose pieces get the top priority. One chunk (16 pieces of
#: 256 KiB) keeps the unpacker fed without undoing rarest-first for the rest.
AHEAD_CHUNKS = 1
#: How often the feeding loop looks at the swarm (s): a status call into libtorrent each
#: time, so not too often with a hundred agents on a host.
POLL = 0.2
#: Seconds to wait for libtorrent to read back the pieces of one chunk.
READ_TIMEOUT = 30.0
#: After the last chunk, keep seeding for at most this many seconds (see :func:`linger`):
#: long enough to bridge the gaps between waves of booting nodes (up to 30 s on the
#: virtual cluster with 50 nodes, power-cycled 8 at a time), short enough that a member
#: that never comes does not hold the others long (and corral's tracker stops counting
#: those 3 min into the session). The node's own completion waits for it; the last nodes
#: of a deployment find nobody in need and leave at once.
LINGER_MAX = 60.0
#: Peers downloading at less than this share of the node's own rate do not keep it.
LINGER_SHARE = 0.3


@dataclass
class FeedStats:
    bytes: int = 0
    from_swarm: int = 0  # chunks
    from_http: int = 0
    mismatched: int = 0  # chunks read from the swarm whose sha256 was not the plan's
    rescues: int = 0  # times the node went back to the seed for pieces no peer had


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
        rack: Collection[str] | None = None,
        lane: Sequence[int] = (),
        partners: Collection[str] = (),
        late: Callable[[], Collection[int]] = frozenset,
        lane_swarm: Swarm | None = None,
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
        self._received = 0
        self._moved = clock()
        self._urgent: list[int] = []
        self._waited = -1e9
        self.seed = SeedUse(
            swarm,
            mine,
            clock,
            rack=rack,
            lane=lane,
            partners=partners,
            late=late,
            lane_swarm=lane_swarm,
        )

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
        """The next chunks' pieces first, unless the node only wants its stripe, its lane,
        or the pieces it asks the seed for."""
        if self.ahead > 0 and self.seed.in_order():
            self.swarm.prioritize(self._urgent)

    def _next(self, index: int) -> bytes:
        """Chunk ``index``, checked, waiting for the swarm until it stalls."""
        span = self.layout.pieces(index)
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            have = self.swarm.pieces()
            count = sum(have)
            # Bytes arriving count as movement, not only whole pieces: a node whose link
            # is full of pieces from eight peers at once completes none for a while, and
            # sending it to HTTP then (on that full link) timed out and failed it.
            received = self.swarm.received()
            if count != self._have or received > self._received:
                self._have, self._received, self._moved = count, received, self.clock()
            self._report()
            before = self.seed.rescuing()
            if self.seed.step(have, self.clock() - self._moved):
                self._prioritize()
            if self.seed.rescuing() and not before:
                self.stats.rescues += 1
            if all(have[p] for p in span):
                data = self._from_swarm(index, span)
                if data is not None:
                    return data
                # wrong bytes from the swarm: the plan's hash wins, over HTTP
                return self._from_http(index)
            # the chunk waits for the stripe of a member still coming: not a stall
            if self.seed.waits_for_members([p for p in span if not have[p]]):
                self._waited = self.clock()
            quiet = self.clock() - max(self._moved, self.seed.started_swarming, self._waited)
            if not self.seed.starting() and quiet >= self.seed.pace.scaled(
                self.stall, STALL_PIECES
            ):
                log.info("chunk %08d: no new piece for %.0f s, fetching it over HTTP", index, quiet)
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
            self.seed.pace.came_elsewhere(len(missing))
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
    age: float = 0.0,
    pending: Callable[[], int] = lambda: 0,
    unfinished: Callable[[], int | None] = lambda: None,
    joined_lately: Callable[[], bool] = lambda: True,
    budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Keep seeding while this node is of use to the swarm, up to ``budget`` seconds
    (:data:`LINGER_MAX`); the time it stayed.

    Of use: a connected peer still wants pieces from it and downloads at LAN speed (at
    least :data:`LINGER_SHARE` of ``own_rate``, this node's own average, by the pieces it
    gained since the node first saw it, or not judged yet); or members of the session
    have not joined yet (``pending``, asked of corral's tracker every 5 s), since the
    nodes of a large deployment boot over a minute or more, in waves, and each wave would
    otherwise have to take the whole stream from the server again. Every piece this node
    serves is one the server does not send. A slow peer is no reason to stay:
    the seed serves it (:class:`SeedUse`), and the others would all wait for it. Two looks
    in a row without a reason end it, since a peer between two requests may look idle once.

    Unless a member joined the swarm lately (``joined_lately``, from corral's tracker),
    every peer has been in it about as long as this node (``age``, seconds), and its pieces
    over that time are its pace. Judged on the pieces it gained since the node first saw
    it, a node at a tenth of B kept its peers: some had met it only once they were done
    (two pieces' time to judge it, 12-13 s, and the deployment waited), and pieces it had
    half-received before completed in a burst, which lifted its pace over the line for
    the last node (60 s).

    A peer in need counts only while corral's tracker says that some member has pieces
    left (``unfinished``; None: the tracker has not said). libtorrent goes on showing a
    peer that wants pieces for seconds after it finished and left: its last messages
    were lost with its connection. At N = 50 on the testbed, nodes stayed 14-19 s after
    the last node had the whole image, and the deployment waited for them.
    """
    budget = LINGER_MAX if budget is None else budget
    start = clock()
    idle = 0
    asked, waiting = -1e9, 0
    while clock() - start < budget and not cancel.is_set():
        if clock() - asked >= 5.0:
            asked, waiting = clock(), pending()
        known_for = 0.0 if joined_lately() else age
        busy = waiting > 0 or (
            unfinished() != 0 and swarm.peers_in_need(LINGER_SHARE * own_rate, known_for) > 0
        )
        idle = 0 if busy else idle + 1
        if idle >= 2:
            break
        swarm.wait(min(0.5, max(0.0, budget - (clock() - start))))
    return clock() - start


class Latecomers:
    """What corral's tracker tells of the session's members (``/pending/INFOHASH``): how
    many have not joined the swarm yet (:meth:`pending`), and the pieces of the stripes
    still on their way to their members (:meth:`pieces`: members not there yet, or just
    come). A thread of its own asks every :data:`ASK_EVERY` seconds, or as often as the
    tracker's last answer says (``every``: a large swarm asks less often) (:meth:`start`),
    so that the feeding loop never waits on a busy server; an answer that does not come
    leaves the last one standing (nothing before the first). While ``striping`` says the
    node's own stripe is coming from the seed, each question says so (``?stripe=coming``):
    the tracker names that stripe as on its way to the others for as long (its
    ``STRIPE_LEASE``), however long the seed takes to send the stripes."""

    #: Seconds between two questions to the tracker, unless it says otherwise.
    ASK_EVERY = 5.0
    #: The longest the tracker may make a node wait between two questions.
    ASK_AT_MOST = 60.0
    #: Seconds to wait for its answer.
    TIMEOUT = 5.0

    def __init__(
        self,
        tracker: str,
        info_hash: str,
        *,
        stripes: tuple[int, int] | None = None,
        turn: int = 0,
    ) -> None:
        self.url = tracker.rsplit("/", 1)[0] + f"/pending/{info_hash}"
        self.stripes = stripes  # (number of pieces, number of stripes)
        self.turn = turn  # the racks' turn in the stripes (swarm.spare_stripes)
        self.striping: Callable[[], bool] = lambda: False  # the receiver: SeedUse.striping
        self._pending = 0
        self._joined = 0  # members that joined lately (the tracker's "coming")
        self._unfinished: int | None = None
        self._pieces: frozenset[int] = frozenset()
        self.every = self.ASK_EVERY
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="corral-latecomers", daemon=True)

    def start(self) -> Latecomers:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.ask()
            self._stop.wait(self.every)

    def ask(self) -> bool:
        """Ask the tracker once; False if it did not answer."""
        try:
            url = self.url + ("?stripe=coming" if self.striping() else "")
            with urllib.request.urlopen(url, timeout=self.TIMEOUT) as answer:
                body = json.load(answer)
            pending, coming = int(body.get("pending", 0)), [int(i) for i in body.get("coming", [])]
            every = float(body.get("every", self.ASK_EVERY))
            left = body.get("unfinished")
            unfinished = None if left is None else int(left) + len(coming)
        except (OSError, ValueError, TypeError, AttributeError):
            return False
        pieces: frozenset[int] = frozenset()
        if self.stripes is not None:
            num_pieces, count = self.stripes
            pieces = frozenset(
                p for i in coming if 0 <= i < count for p in stripe(num_pieces, i, count, self.turn)
            )
        self._pending, self._pieces, self._unfinished = pending, pieces, unfinished
        self._joined = len(coming)
        self.every = min(max(every, self.ASK_EVERY), self.ASK_AT_MOST)
        return True

    def pending(self) -> int:
        return self._pending

    def unfinished(self) -> int | None:
        """Members that still take pieces: those the tracker heard have some left, and
        those that joined just now (their stripe is on its way). None until the tracker
        says (an older corral does not)."""
        return self._unfinished

    def pieces(self) -> frozenset[int]:
        """The pieces of the stripes still on their way to their members."""
        return self._pieces

    def joined_lately(self) -> bool:
        """Whether a member joined the swarm lately or has yet to (its stripe is on its
        way), or the tracker has not answered yet: a peer first seen now may have just
        come."""
        return self._unfinished is None or self._pending > 0 or self._joined > 0
