"""When a node talks to corral's seed (:class:`SeedUse`): what keeps the server's egress
near one copy of the stream."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Literal

from corral.agent.receivers.bittorrent.swarm import Swarm, pieces

log = logging.getLogger("corral.agent")

#: Seconds without a byte of its stripe after which a node turns to its peers anyway (a
#: seed that stopped sending; its peers will ask the seed for the rest). A busy seed is no
#: reason: it sends every stripe at once, each at its share of the server's link, so the
#: stripes together (one copy) take S / B_server to go out and every node's ends about
#: then: 10 s at N = 100 on the testbed's 20 Mbit/s server link, 25 s on a 10 Mbit/s one.
#: Giving up sooner made nodes drop stripes the seed was about to send, and the pieces
#: nobody then held came from the seed again, as rescues, once per node. A bound counted
#: from the stripe's start (20 s, until 2026-12) did that on the 10 Mbit/s link: 11-15
#: nodes of 100 a run gave their stripes up while they were coming, and the seed sent
#: 1.7-1.9 x S instead of about one copy.
STRIPE_TIMEOUT = 20.0
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
#: Seconds that a piece may be at no connected peer before the node asks the seed for it
#: even though other pieces keep coming (its member died before passing it on; without
#: a tracker that names the members still coming, the first nodes of a deployment that
#: boots in waves would wait for the stripes of the last ones). Counted for each piece.
#: Counted from the first piece at no peer while others came and went (until 2026-12),
#: at N = 100 on 1 Mbit/s links every node found pieces at no peer for long in the
#: minute after the stripes, which were only on their way from their members, and the
#: seed sent 0.6 x S more on a 62 MiB image.
ORPHAN_WAIT = 5.0
#: Seconds, from the node's start, during which it leaves the stripes of the members that
#: have not joined yet or have just come (corral's tracker names them) to those members:
#: each takes its own from the seed, and the seed sends it once. Rescued by the nodes
#: there instead, those pieces went out once per node in need, and again as the member's
#: own stripe: at a start skew of 30 s, 1.8-2.0 x S from the seed against 1.15 x S
#: without skew. The tracker stops naming the members still missing once none has joined
#: for a while (its ``ARRIVAL_QUIET``: the boot wave is over, their power-on failed), and
#: after its ``JOIN_WINDOW``; this bound, the same as the latter, is for a tracker that
#: stopped answering and left its last answer standing.
LATE_WAIT = 180.0


#: The timings above are floors, for a node that has not measured its pace yet and for
#: fast links; each also scales with the node's measured piece time (:class:`PieceClock`),
#: so that on a slow link, where a piece takes a second or more, a normal gap between two
#: pieces is not read as trouble (a rescue from the seed: egress) or a stall (HTTP):
#: nothing new for this many pieces' time is a rescue ...
IDLE_PIECES = 4
#: ... a piece at no peer for this many, an orphan rescue (a member serves eight peers at
#: once, the agent's upload slots, so the first copy of its piece elsewhere takes eight
#: pieces' time at its link, more while those peers take from others too) ...
ORPHAN_PIECES = 20
#: ... and a stripe from the seed is late after this many without a byte.
STRIPE_PIECES = 10


class PieceClock:
    """How long a piece takes to arrive at this node, measured.

    Over windows of at least :attr:`WINDOW` seconds in which pieces came, the time per new
    piece; the fastest of the last few windows: the pace the node's link and its peers can
    keep. A window slowed by a pause (the swarm waiting for a stripe, a rescue under way)
    says nothing of the link, and must not stretch the timings that detect such pauses."""

    WINDOW = 2.0

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._since: float | None = None
        self._count = 0
        self.samples: deque[float] = deque(maxlen=5)
        self._elsewhere = 0

    def came_elsewhere(self, pieces: int) -> None:
        """``pieces`` came over HTTP, not from the swarm: they say nothing of its pace."""
        self._elsewhere += pieces

    def observe(self, count: int) -> None:
        """``count`` pieces are here now."""
        count -= self._elsewhere
        now = self.clock()
        if self._since is None or count < self._count:
            self._since, self._count = now, count
            return
        if now - self._since < self.WINDOW:
            return
        if count > self._count:
            self.samples.append((now - self._since) / (count - self._count))
        self._since, self._count = now, count

    def piece_time(self) -> float | None:
        return min(self.samples) if self.samples else None

    def scaled(self, floor: float, pieces: float) -> float:
        """``pieces`` pieces' time at the measured pace, and at least ``floor`` seconds."""
        measured = self.piece_time()
        return floor if measured is None else max(floor, pieces * measured)


#: Seconds a node that has its lane (see :class:`SeedUse`) waits, at most, for the nodes
#: elsewhere that bring its own stripe into their racks to have it from it: once it trades
#: with its own rack only, they can no longer take it from it (they take it from the seed
#: then, which crosses their uplink once all the same).
LANE_HANDOVER = 5.0
#: ... and the lane's own patience: seconds in the import phase, the stripes of members
#: still coming aside, before the node leaves what it lacks of its lane to its rack's
#: rescues (floor of :data:`LANE_PIECES` pieces' time).
LANE_TIMEOUT = 30.0
LANE_PIECES = 20
#: ... which is stretched to this many times the lane's own time at the pace its pieces
#: have come so far: a rack's uplink may be slower than the node's link. In 20 racks of
#: 5 behind 2.5 Mbit/s uplinks (4:1) a rack takes 95 s to bring in 0.95 x S, every
#: node gave its lane up after 30 s, and the rack's rescues took the rest from the seed,
#: once per node or so: 17.6 x S of egress at N = 100.
LANE_SLACK = 1.5
#: pieces' time of the handover (floor :data:`LANE_HANDOVER`)
HANDOVER_PIECES = 5

#: Seconds to wait for libtorrent to read back the pieces moved between a node's two
#: sessions (see :class:`SeedUse`).
MOVE_TIMEOUT = 10.0

#: Where a node is in its use of the seed (see :class:`SeedUse`).
Phase = Literal["plain", "look", "stripe", "import", "swarm", "rescue"]
#: The phases before a node takes pieces from its peers.
STARTING: tuple[Phase, ...] = ("look", "stripe", "import")


class LaneSession:
    """A lane's session of its own beside the node's (see :class:`SeedUse`): the pieces
    moved between the two, and when it last received a byte.

    ``ours`` are the pieces it serves the partners (the node's stripe and its lane),
    ``lane`` those it brings in."""

    def __init__(self, swarm: Swarm, node: Swarm, ours: Sequence[int], lane: Sequence[int]) -> None:
        self.swarm = swarm
        self.node = node
        self.ours = list(ours)
        self.lane = list(lane)
        #: its pieces at the last look, those moved into it counted
        self.held: Sequence[bool] = ()
        self._moved: set[int] = set()  # pieces moved from one session to the other
        self._received = (0, 0.0)  # bytes it had received, and when

    def look(self, have: Sequence[bool], dial: bool) -> None:
        """Move what came since the last look, ``have`` being the node's session's pieces:
        the node's stripe into the lane's session, for the partners, and the lane's pieces
        out of it, for the rack, as each comes. Pieces of the lane that the node's session
        got from the rack (a rack-mate asked the seed for them) go into the lane's session
        too: it does not bring them in again. Dial the partners not connected if ``dial``
        (once its lane is in, those still in need come to the node by themselves); its
        pieces are :attr:`held` then."""
        lane = self.swarm
        lane.meet(dial=dial)
        held = list(lane.pieces())
        for source, target, wanted in (
            (self.node, lane, [p for p in self.ours if have[p] and not held[p]]),
            (lane, self.node, [p for p in self.lane if held[p] and not have[p]]),
        ):
            wanted = [p for p in wanted if p not in self._moved]
            if wanted:
                got = source.read(wanted, MOVE_TIMEOUT)
                target.add(got)
                self._moved.update(got)
                if target is lane:
                    for piece in got:
                        held[piece] = True
        self.held = held

    def idle(self, now: float, since: float) -> float:
        """Seconds since it last received a byte, and since ``since`` at most (its rescues
        ask for that, not for the rack's pieces that keep coming meanwhile)."""
        received = self.swarm.received()
        before, when = self._received
        if received > before or not when:
            self._received = received, now
        return now - max(self._received[1], since)


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
        that comes late finds the others seeding), after :data:`STRIPE_TIMEOUT` seconds
        without a byte of it, or when for twice :data:`RESCUE_IDLE` not even the seed
        has it (it is not connected);
    ``swarm``
        then, the seed blocked (libtorrent's IP filter), every other piece from the peers,
        who hold each other's stripes;
    ``rescue``
        when the node has received nothing for :data:`RESCUE_IDLE` seconds (on a LAN a
        piece takes a fraction of a second), the seed again, for the pieces that at most
        one connected peer has: their stripe's member died before passing it on, or is
        slow; and for a piece that no connected peer has had for :data:`ORPHAN_WAIT`
        seconds while others came, that piece. Not the stripes of members that have not
        joined yet or have just come (``late``, from corral's tracker), for up to
        :data:`LATE_WAIT` seconds: those members take them from the seed, and a node
        waiting for them is not stalled.
        Only those are wanted meanwhile, so the seed sends nothing the peers could, and
        only until they are here or, every :data:`RESCUE_MAX` seconds, until a second
        peer has those still missing. The peers in need (likely all lacking the same
        pieces) share the rescue: each asks for every k-th piece by their order of
        address, and all of them if that has not helped after three times
        :data:`RESCUE_IDLE`. A node that starts half a minute or more before the
        others (the tracker's ``ARRIVAL_QUIET``) gets most of the image this way,
        unicast: there is nobody to share with yet.

    Without a stripe in the plan (a single node, an older server) the seed stays in use.

    In a rack (``rack``: its nodes' addresses), a node brings its *lane* into the rack
    (``lane``: the pieces of the stripes of nodes elsewhere that it alone brings in; see
    :func:`~corral.deploy.transports.bittorrent_tracker.lanes`), so that each piece
    crosses the rack's uplink once and every node of the rack carries a share of it:

    ``import``
        after its stripe, the seed kept away, it wants its lane only, from its lane
        partners (the nodes elsewhere the tracker gave it, which hold stripes of its lane
        or take stripes from it: see
        :func:`~corral.deploy.transports.bittorrent_tracker.partners`). A partner wants
        nothing but stripes of the lane either until its own import ends, and then cuts its
        connections out of its rack, so nothing else crosses the uplink. Pieces of its
        lane at no connected peer (the partner died; not a member still coming) are
        asked of the seed after :data:`RESCUE_IDLE` without anything new. Once its lane
        is here the node waits, up to :data:`LANE_HANDOVER`, for the partners still
        lacking its own stripe; after :data:`LANE_TIMEOUT` (longer where the lane comes
        slowly but comes: :data:`LANE_SLACK`) it leaves what is missing of its lane to the
        rack's rescues. (In ``look`` too, a node with a lane wants
        nothing from its peers.)
    ``swarm``, ``rescue``
        then only its rack's nodes (and the seed, in a rescue) can reach it
        (libtorrent's IP filter). It does not rescue the pieces at no peer of its rack:
        a node of the rack is bringing them in, and the seed would send them over the
        rack's uplink once more. It still rescues after :data:`RESCUE_IDLE` without
        anything new.

    With a session of its own for the lane (``lane_swarm``: a
    :class:`~corral.agent.receivers.bittorrent.libtorrent_swarm.LaneSwarm`, which the agent
    opens in small racks, where the lane is a large share of the image: see
    :data:`~corral.agent.receivers.bittorrent.receiver.LANE_SESSION_SHARE`), the import
    does not hold up the rack's trade. The node's own session is kept to its rack from the
    start and, from the import's start, takes every piece its rack has; the lane's session
    wants the lane only, from the partners, and asks the seed for what none of them has
    after :data:`RESCUE_IDLE` without a byte *in that session*. Each piece of the lane is
    handed to the node's session as it comes, for the rack; the node's stripe, and the
    lane's pieces the rack brought first, go the other way, for the partners. The lane is
    late only when its session has received nothing for :data:`LANE_TIMEOUT`, and that
    session serves the partners until the node leaves: there is no handover to wait for.
    In one session, the node could not take its rack's pieces during the import:
    libtorrent takes a piece from any peer that has it, the partners too, across the
    uplink.
    """

    def __init__(
        self,
        swarm: Swarm,
        mine: Sequence[int] | None,
        clock: Callable[[], float],
        *,
        rack: Collection[str] | None = None,
        lane: Sequence[int] = (),
        partners: Collection[str] = (),
        late: Callable[[], Collection[int]] = frozenset,
        lane_swarm: Swarm | None = None,
    ) -> None:
        self.swarm = swarm
        self.clock = clock
        self.late = late
        self.born = clock()
        self.rack = None if rack is None else frozenset(rack)
        self.started = clock()
        self.mine = list(mine) if mine is not None else None
        self.lane = sorted(set(lane)) if self.rack is not None else []
        self.partners = frozenset(partners)
        #: the lane's own session, if the node has one (see the class)
        self.own = (
            LaneSession(lane_swarm, swarm, [*(self.mine or ()), *self.lane], self.lane)
            if lane_swarm is not None and self.lane
            else None
        )
        self.rescue: list[int] = []
        self._lane_since = 0.0  # the import phase's start, then the lane's arrival
        self._lane_got = (0, 0, 0.0)  # lane pieces at the start, then got, and when
        self._lane_done = False
        self.since = 0.0
        self._looked = -1e9
        #: since when each piece it lacks has been at no connected peer (see
        #: :data:`ORPHAN_WAIT`)
        self._orphaned: dict[int, float] = {}
        self._alone_since = float("inf")
        self._seedless_since = float("inf")
        self.pace = PieceClock(clock)
        #: when the node began taking pieces from its peers (the end of look and stripe)
        self.started_swarming = self.started
        if self.mine is None:
            self.phase = "plain"
            swarm.use_seed(True)
        else:
            self.phase = "look" if self.mine else "swarm"
            swarm.use_seed(False)
            if self.own is not None and self.rack is not None:
                swarm.keep_to(self.rack)  # the partners are met in the lane's session
            if self.lane and self.mine:
                swarm.want([])  # what a partner elsewhere holds is not for it yet

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, value: Phase) -> None:
        old = getattr(self, "_phase", None)
        if value != old:
            self._phase_at = self.clock()
            if old in STARTING and value not in STARTING:
                self.started_swarming = self._phase_at
        self._phase = value

    def in_order(self) -> bool:
        """Whether the feed may ask for the next chunks' pieces first: not while the node
        wants its stripe, its lane or a rescue only."""
        return self._phase in ("plain", "swarm") or (self._phase == "look" and not self.lane)

    def starting(self) -> bool:
        """Still meeting its peers or getting its stripe or its lane: no chunk is wanted
        yet, so none can stall (the stripe and the lane have their own timeouts)."""
        return self._phase in STARTING

    def striping(self) -> bool:
        """Taking its stripe from the seed."""
        return self._phase == "stripe"

    def rescuing(self) -> bool:
        """Taking from the seed pieces that no peer has (a rescue)."""
        return self._phase == "rescue"

    def step(self, have: Sequence[bool], idle: float) -> bool:
        """Move on if it is time, given the pieces here and the seconds since the last new
        one; True when the wanted pieces changed (priorities must be set again).

        Idleness counts from the current phase's start at the earliest: a node that looked
        at its peers for 4 s got nothing meanwhile (the seed was kept away, the peers had
        nothing yet), and that is no reason to find its stripe late the moment it asks the
        seed for it. (It was: every node gave up its stripe at once, nobody took the
        stripes from the seed, every piece was at no peer, and the rescues sent the image
        from the seed once per node or so: 27 x S of egress at N = 100.)"""
        now = self.clock()
        waited = now - self.started
        idle = min(idle, now - self._phase_at)
        self.pace.observe(sum(have))
        if self.own is not None:
            self.own.look(have, dial=not self._lane_done)
        rescue_idle = self.pace.scaled(RESCUE_IDLE, IDLE_PIECES)
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
                if self.rack is None:
                    self.phase = "swarm"
                    return False
                return self._after_stripe(have, now)
            self.phase, self.started = "stripe", now
            self.swarm.want(left)
            self.swarm.use_seed(True)
            return True
        if self.phase == "stripe":
            assert self.mine is not None
            left = [p for p in self.mine if not have[p]]
            # a latecomer finds nodes that have everything: its stripe is theirs to give
            sources = self._available(left)
            shared = bool(left) and all(a >= 2 for a in sources)
            # nobody has it, not even the seed: the seed is not connected (down, or corral
            # serve restarting); a busy seed is connected, and its stripe comes in its turn
            if left and not any(sources):
                self._seedless_since = min(self._seedless_since, now)
            else:
                self._seedless_since = float("inf")
            late = (
                idle >= self.pace.scaled(STRIPE_TIMEOUT, STRIPE_PIECES)
                or now - self._seedless_since >= 2 * rescue_idle
            )
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
                self.swarm.use_seed(False)
                self._after_stripe(have, now)
                return True
        elif self.phase == "import":
            return self._import(have, idle, now, rescue_idle)
        elif (
            self.phase == "swarm"
            and not all(have)
            and (self.swarm.heard() or waited >= TRACKER_WAIT)
            and (due := self._rescue_due(have, idle, now, rescue_idle)) is not None
        ):
            available = self._counts(len(have))  # the seed is not connected: peers only
            if available is None:
                return False
            missing = [p for p, h in enumerate(have) if not h]
            # stalled: the pieces at most one peer has; else the orphans that are due
            rare = due or [p for p in missing if available[p] <= 1]
            awaited = self.awaited()
            rare = [p for p in rare if p not in awaited]
            # The connected peers that still download lack the same pieces, most likely:
            # each asks the seed for its share only and gets the others' from them. If
            # that has not worked out (they see other peers), all of them.
            position, count = self.swarm.present()
            if idle < 3 * rescue_idle and count > 1:
                rare = [p for p in rare if p % count == position]
            for piece in due:  # the others' shares get their time too
                self._orphaned[piece] = now
            if not rare:
                return False
            log.info(
                "bittorrent: %s; asking the seed for %s "
                "(%d missing, %d at no peer, %d peers in need)",
                f"{pieces(len(due))} at no peer for long"
                if due
                else f"nothing new for {idle:.0f} s",
                pieces(len(rare)),
                len(missing),
                sum(1 for p in missing if not available[p]),
                count,
            )
            self.phase, self.rescue, self.since = "rescue", rare, now
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

    def _after_stripe(self, have: Sequence[bool], now: float) -> bool:
        """The stripe is done with: the lane next, if the node has one to bring in, else
        the swarm (its rack's only, in a rack); True (the wanted pieces changed)."""
        importer = self.swarm if self.own is None else self.own.swarm
        held = have if self.own is None else self.own.held
        left = [p for p in self.lane if not held[p]]
        if left:
            log.info("bittorrent: bringing %s into my rack", pieces(len(left)))
            self.phase, self._lane_since = "import", now
            self._lane_got = (len(self.lane) - len(left), 0, now)
            importer.want(left)
            if self.own is not None:  # the rack's trade meanwhile, all of it
                self.swarm.want(None)
        else:
            self._to_swarm()
        return True

    def _to_swarm(self) -> None:
        self.phase = "swarm"
        self._orphaned.clear()
        if self.rack is not None:
            self.swarm.keep_to(self.rack)
        self.swarm.want(None)
        if self.own is not None:
            self.own.swarm.want([])  # it goes on serving the partners what it has

    def _import(self, have: Sequence[bool], idle: float, now: float, rescue_idle: float) -> bool:
        """One look in the import phase (see the class)."""
        importer = self.swarm if self.own is None else self.own.swarm
        traded = sum(have)  # the rack's session's pieces, the lane's moved in so far too
        if self.own is not None:
            have = self.own.held
            idle = self.own.idle(now, self._lane_since)
        left = [p for p in self.lane if not have[p]]
        if self.rescue:
            if left and not all(have[p] for p in self.rescue) and now - self.since < RESCUE_MAX:
                return False
            self.rescue = []
            importer.use_seed(False)
            if left:
                importer.want(left)
                return True
        if not left:
            if not self._lane_done:
                self._lane_done, self._lane_since = True, now
                log.info(
                    "bittorrent: my lane is here%s",
                    f", with {traded} of {len(have)} pieces" if self.own else "",
                )
            if self.own is not None:  # its session goes on serving the partners
                self._to_swarm()
                return True
            handover = self.pace.scaled(LANE_HANDOVER, HANDOVER_PIECES)
            waiting = self._partners_in_need()
            if waiting and now - self._lane_since < handover:
                return False
            if waiting:
                log.info(
                    "bittorrent: %s still lack my stripe; my rack's only now",
                    ", ".join(sorted(waiting)),
                )
            self._to_swarm()
            return True
        self._note_lane(len(left), now)
        if self._lane_late(idle, now) and not self.waits_for_members(left):
            log.info(
                "bittorrent: %s of my lane late (%s); my rack's only now",
                pieces(len(left)),
                ", ".join(map(str, left[:8])),
            )
            self._to_swarm()
            return True
        if idle < rescue_idle or not self.swarm.heard():
            return False
        awaited = self.awaited()
        nowhere = [
            p
            for p, a in zip(left, self._available(left, importer), strict=True)
            if not a and p not in awaited
        ]
        if not nowhere:
            return False
        log.info("bittorrent: %s of my lane at no peer; asking the seed", pieces(len(nowhere)))
        self.rescue, self.since = nowhere, now
        importer.want(nowhere)
        importer.use_seed(True)
        return True

    def _note_lane(self, left: int, now: float) -> None:
        """Count the lane's pieces come during the import, ``left`` of them still to come,
        and when the last one came."""
        had, got, _ = self._lane_got
        arrived = len(self.lane) - left - had
        if arrived > got:
            self._lane_got = had, arrived, now

    def _lane_late(self, idle: float, now: float) -> bool:
        """Whether to give the rest of the lane up (see :meth:`_lane_patience`). With a
        session of its own the lane holds nothing up: it is late only once that session
        has received nothing for as long (at 4:1 behind a rack's uplink of 2.5 Mbit/s, a
        lane of 23 pieces from 8 partners completed its first piece after more than 30 s,
        was given up, and its pieces came from the seed)."""
        if self.own is not None:
            return idle >= self.pace.scaled(LANE_TIMEOUT, LANE_PIECES)
        return now - self._lane_since >= self._lane_patience()

    def _lane_patience(self) -> float:
        """Seconds the import may take: :data:`LANE_TIMEOUT` (or :data:`LANE_PIECES`
        pieces' time), stretched to :data:`LANE_SLACK` times the whole lane's time at the
        pace of its pieces until the last one came (see :meth:`_note_lane`; a lane that
        stopped coming is not waited for any longer)."""
        had, got, last = self._lane_got
        patience = self.pace.scaled(LANE_TIMEOUT, LANE_PIECES)
        if got:
            whole = (last - self._lane_since) * (len(self.lane) - had) / got
            patience = max(patience, LANE_SLACK * whole)
        return patience

    def _partners_in_need(self) -> set[str]:
        """The connected lane partners that lack some of this node's stripe (without a
        list of them: the peers elsewhere that do). One not connected has ended its
        import or has not come: it takes what it lacks of its lane from the seed, which
        crosses its rack's uplink once all the same."""
        lacking = self.swarm.lacking(self.mine or [])
        return lacking & self.partners if self.partners else lacking - (self.rack or frozenset())

    def awaited(self) -> Collection[int]:
        """The pieces left to members that have not joined yet (see :data:`LATE_WAIT`)."""
        if self.clock() - self.born >= LATE_WAIT:
            return frozenset()
        return self.late()

    def waits_for_members(self, pieces: Collection[int]) -> bool:
        """Every one of ``pieces`` is left to a member that has not joined yet."""
        if not pieces:
            return False
        awaited = self.awaited()
        return all(p in awaited for p in pieces)

    def in_rack(self) -> bool:
        """Trading with its rack only (see the class)."""
        return self.rack is not None and self.swarm.addresses() <= self.rack

    def _met(self, waited: float) -> bool:
        """Connected to a peer, or looked long enough (the first node finds nobody)."""
        return waited >= 4 * LOOK_TIME or self.swarm.connected() > 0

    def _rescue_due(
        self, have: Sequence[bool], idle: float, now: float, rescue_idle: float
    ) -> list[int] | None:
        """Whether to ask the seed (looked at once a second): ``[]`` when nothing new came
        for ``rescue_idle`` seconds; the pieces at no connected peer for
        :data:`ORPHAN_WAIT` seconds, each (both scaled to the node's pace; the second not
        in a rack), if there are any; None otherwise, and while the node has no peer at
        all, for :data:`ALONE_WAIT` seconds (it is still connecting, or the first of its
        deployment: the others are booting)."""
        if now - self._looked < 1.0:
            return None
        self._looked = now
        if self.swarm.connected() == 0:
            self._alone_since = min(self._alone_since, now)
            if now - self._alone_since < ALONE_WAIT:
                return None
        else:
            self._alone_since = float("inf")
        if idle >= rescue_idle:
            return []
        if self.in_rack():
            return None
        available = self._counts(len(have))
        if available is None:
            return None
        awaited = self.awaited()
        since = self._orphaned
        self._orphaned = {
            p: since.get(p, now)
            for p, (h, a) in enumerate(zip(have, available, strict=False))
            if not h and not a and p not in awaited
        }
        wait = self.pace.scaled(ORPHAN_WAIT, ORPHAN_PIECES)
        due = [p for p, first in self._orphaned.items() if now - first >= wait]
        return due or None

    def _available(self, pieces: Sequence[int], swarm: Swarm | None = None) -> list[int]:
        """How many connected sources have each of ``pieces`` (the seed counts for one;
        0 if libtorrent cannot say), in ``swarm`` (the node's, or its lane's)."""
        available = (swarm or self.swarm).availability()
        return [available[p] if p < len(available) else 0 for p in pieces]

    def _counts(self, num_pieces: int) -> list[int] | None:
        """Every piece's count of connected sources; None when libtorrent has none to
        give (it keeps no piece picker for a torrent it considers complete)."""
        available = list(self.swarm.availability())
        return available if len(available) == num_pieces else None
