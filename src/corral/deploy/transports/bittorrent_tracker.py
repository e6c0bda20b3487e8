"""The ``bittorrent`` transport's tracker (:class:`Tracker`): a tiny HTTP tracker on its
own port, stdlib ``http.server`` in a thread of corral serve, that hands each node the
session's other members (:class:`Swarms`) and tells the nodes done first how many members
have not joined yet. See :mod:`corral.deploy.transports.bittorrent`."""

from __future__ import annotations

import json
import logging
import math
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from corral.agent.receivers.bittorrent.feed import Latecomers
from corral.agent.wire.bencode import bencode
from corral.errors import ConfigError

log = logging.getLogger("corral.deploy")
T = TypeVar("T")
#: Seconds between two announces of a peer. BitTorrent's usual 30 min suits swarms that
#: live for days; a deployment lives for minutes, and nodes boot over a few seconds.
#: Peers find each other from a node's first announce anyway (each connects to the peers it
#: is given); the re-announces only refresh the tracker's view, e.g. after a restart of
#: corral serve, so 10 s is often enough for that and costs nothing on a LAN.
ANNOUNCE_INTERVAL = 10
#: Peers a node gets in one answer. Every node of a LAN swarm can reach every other, but a
#: connection costs memory and CPU on both ends and each piece a HAVE message on each:
#: 50 (the usual numwant) gives a well-mixed swarm; the nodes given to each other connect
#: both ways, so each ends with about twice as many.
MAX_PEERS = 50
#: Announces a second the tracker asks of a swarm at most, and questions to ``/pending``:
#: a large swarm is told to announce and ask less often (every ``members / rate`` seconds,
#: not less than the usual), so that 10,000 nodes cost corral serve what 2,000 do. Each
#: request takes the tracker's thread about 0.4-0.8 ms of CPU, most of it HTTP's
#: (bench/tracker.py): 10,000 nodes at the usual rates would take 1.5 cores.
ANNOUNCES_PER_SECOND = 200
QUESTIONS_PER_SECOND = 400
#: A peer not heard of for this many intervals has left.
EXPIRE_INTERVALS = 3
#: Seconds after a session starts during which the nodes that are done wait for members
#: that have not joined yet (see :meth:`Swarms.pending`). On the virtual cluster, 50 nodes
#: power-cycled 8 at a time reach the swarm over about 65 s.
JOIN_WINDOW = 180.0
#: Seconds without a member joining after which the members still missing are not waited
#: for (see :meth:`Swarms.coming`): the boot wave is over, and their power-on failed. Nodes
#: powered on over a minute or more come a few seconds apart, however long the wave; a
#: bound counted from each node's own start instead (the agent's, 60 s until 2026-12) ran
#: out for the first nodes at a start skew of 60 s, whose last nodes came 84-92 s after
#: the first on the testbed: 35 of them asked the seed for the stripes of the 20 still
#: booting, which then took them from the seed again, 0.3 x S more egress.
ARRIVAL_QUIET = 30.0
#: Seconds after a member's first announce during which its stripe is still its own to
#: take from the seed (see :meth:`Swarms.coming`), whatever it says: a node asks the seed
#: for its stripe a few seconds after it joins, and says so at its next question to
#: ``/pending`` (:data:`STRIPE_LEASE`). Rescued by the others before, those pieces went out
#: from the seed once per node in need: at a start skew of 30 s, 1.8-2.0 x S from the seed,
#: against 1.15 x S without.
STRIPE_GRACE = 20.0
#: A member's questions to ``/pending`` say whether its stripe is still coming from the
#: seed (``?stripe=coming``), and it is named as on its way for this many times the
#: questions' interval after the last that said so. The stripes come together, each at its
#: share of the server's link, so they take S / B_server: 25 s at N = 100 on a 10 Mbit/s
#: server link, where STRIPE_GRACE alone ran out and from 20 s the first nodes done with
#: theirs asked the seed for the pieces of stripes still on their way (0.26-0.33 x S more
#: from the seed). A node that gives its stripe up, or dies, stops saying so.
STRIPE_LEASE = 3
#: Seconds between two sweeps of a swarm for silent peers (each announce skips those it
#: meets, so a sweep only bounds the memory they hold).
SWEEP_EVERY = 1.0
#: Seconds an answer to ``/pending`` is given again unchanged while no member came.
LATECOMERS_FRESH = 1.0


@dataclass
class _Peer:
    ip: str
    port: int
    left: int
    seen: float
    compact: bytes = b""  # its address as answers give it (BEP 23)

    def __post_init__(self) -> None:
        self.compact = _compact(self.ip, self.port)


class _Bag:
    """Keys to draw from at random: adding, removing and drawing ``k`` take time that does
    not grow with the bag (a list, and each key's place in it)."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.where: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: bytes) -> None:
        if key not in self.where:
            self.where[key] = len(self.keys)
            self.keys.append(key)

    def discard(self, key: bytes) -> None:
        at = self.where.pop(key, None)
        if at is None:
            return
        last = self.keys.pop()
        if at < len(self.keys):
            self.keys[at] = last
            self.where[last] = at


@dataclass
class _Swarm:
    """One session's swarm. Each announce touches a handful of peers, not all of them:
    at 10,000 nodes announcing every 10 s, a scan of every peer per announce (3.6 ms
    each) took more than three cores of corral serve."""

    allowed: frozenset[str] | None  # None: any address
    members: tuple[str, ...]  # the nodes' addresses by stripe ("": not known; none: unknown)
    servers: frozenset[str]  # corral's own addresses: its seed announces from one
    racks: Mapping[str, str]  # a node's address -> its rack, for the nodes in one
    peers: dict[bytes, _Peer] = field(default_factory=dict)  # peer_id -> peer
    seen: dict[str, float] = field(default_factory=dict)  # address -> its first announce
    opened: float = 0.0
    partners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # see lanes()
    striping: dict[str, float] = field(default_factory=dict)  # address -> its last "coming"
    # indexes of ``peers``, kept by put() and drop()
    seeds: dict[bytes, None] = field(default_factory=dict)  # peers at corral's addresses
    everyone: _Bag = field(default_factory=_Bag)  # the others
    by_rack: dict[str, _Bag] = field(default_factory=dict)  # the others in each rack
    by_ip: dict[str, set[bytes]] = field(default_factory=dict)
    complete: int = 0  # peers with nothing left
    unseen: set[str] = field(default_factory=set)  # members not announced yet
    swept: float = 0.0  # when silent peers were last forgotten
    latecomers: tuple[float, int, bytes] | None = None  # (when, len(seen), /pending body)

    def __post_init__(self) -> None:
        self.unseen = {ip for ip in self.members if ip and ip not in self.seen}
        for key, peer in list(self.peers.items()):  # a swarm opened again: index them anew
            del self.peers[key]
            self._add(key, peer)

    def put(self, key: bytes, ip: str, port: int, left: int, now: float) -> None:
        """Add a peer, or refresh it (the same peer id at the same address and port)."""
        old = self.peers.get(key)
        if old is not None and (old.ip, old.port) == (ip, port):
            self.complete += (left == 0) - (old.left == 0)
            old.left, old.seen = left, now
            return
        self.drop(key)
        self._add(key, _Peer(ip, port, left, now))

    def _add(self, key: bytes, peer: _Peer) -> None:
        self.peers[key] = peer
        self.complete += peer.left == 0
        if peer.ip in self.servers:
            self.seeds[key] = None
            return
        self.everyone.add(key)
        rack = self.racks.get(peer.ip)
        if rack is not None:
            self.by_rack.setdefault(rack, _Bag()).add(key)
        self.by_ip.setdefault(peer.ip, set()).add(key)

    def drop(self, key: bytes) -> None:
        peer = self.peers.pop(key, None)
        if peer is None:
            return
        self.complete -= peer.left == 0
        self.seeds.pop(key, None)
        self.everyone.discard(key)
        rack = self.racks.get(peer.ip)
        if rack is not None and rack in self.by_rack:
            self.by_rack[rack].discard(key)
        keys = self.by_ip.get(peer.ip)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_ip[peer.ip]

    def sweep(self, expired: float) -> None:
        """Forget the peers not heard of since ``expired``."""
        for key in [k for k, p in self.peers.items() if p.seen < expired]:
            self.drop(key)


class Swarms:
    """The tracker's state: who is in which session's swarm. Thread-safe, no I/O."""

    def __init__(
        self,
        *,
        interval: int = ANNOUNCE_INTERVAL,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.interval = interval
        self.max_peers = max_peers
        self.clock = clock
        self.rng = rng or random.Random()
        self._swarms: dict[bytes, _Swarm] = {}
        self._lock = threading.Lock()

    def open(
        self,
        info_hash: bytes,
        allowed: Iterable[str] | None,
        members: Sequence[str] = (),
        servers: Iterable[str] = (),
        racks: Mapping[str, str] | None = None,
    ) -> None:
        """Answer for ``info_hash``, to ``allowed`` addresses (None: any); ``members`` are
        the addresses of the nodes expected to join, in the order of their stripes (see
        :meth:`pending`; "" for a node whose address is not known), ``servers`` corral's own,
        ``racks`` the rack of each node's address that is in one (see :meth:`choose`)."""
        # outside the lock, which every announce takes: at 10,000 members in 250 racks
        # the lanes are millions of steps (a second)
        racks = racks or {}
        pairs = {
            m: tuple(sorted(p)) for m, p in partners(members, lanes(members, racks), racks).items()
        }
        with self._lock:
            old = self._swarms.get(info_hash)
            self._swarms[info_hash] = _Swarm(
                None if allowed is None else frozenset(allowed),
                tuple(members),
                frozenset(servers),
                dict(racks or {}),
                old.peers if old else {},
                old.seen if old else {},
                old.opened if old else self.clock(),
                pairs,
                old.striping if old else {},
            )

    def pending(self, info_hash: bytes) -> int:
        """Members that have not joined the swarm yet: nodes still booting, which will need
        pieces soon. The nodes that are done linger for them (see the agent's linger()).
        After :data:`JOIN_WINDOW` seconds a member that has not come is not waited for
        (its power-on failed; the deployment fails it after its boot timeout)."""
        with self._lock:
            swarm = self._joining(info_hash)
            return 0 if swarm is None else len(swarm.unseen)

    def coming(self, info_hash: bytes) -> list[int]:
        """The stripes (positions in ``members``) still on their way to their members:
        members that joined less than :data:`STRIPE_GRACE` seconds ago or said lately that
        theirs is still coming (:meth:`striping`), and those that have not joined yet while
        members still come (the last joined less than :data:`ARRIVAL_QUIET` seconds ago,
        or none has yet; within :data:`JOIN_WINDOW`, as :meth:`pending`). The nodes there
        leave those pieces to them (the agent's ``SeedUse``): each member takes its own
        stripe from the seed, once, and passes it on."""
        with self._lock:
            swarm, now = self._joining(info_hash), self.clock()
            if swarm is None:
                return []
            joins = [t for ip, t in swarm.seen.items() if ip not in swarm.servers]
            arriving = now - max(joins, default=now) < ARRIVAL_QUIET
            lease = STRIPE_LEASE * self.ask_every(swarm)

            def on_its_way(ip: str) -> bool:
                if ip not in swarm.seen:
                    return arriving
                return (
                    now - swarm.seen[ip] < STRIPE_GRACE
                    or now - swarm.striping.get(ip, -math.inf) < lease
                )

            return [i for i, ip in enumerate(swarm.members) if ip and on_its_way(ip)]

    def striping(self, info_hash: bytes, ip: str) -> None:
        """The member at ``ip`` says its stripe is still coming from the seed (it asked
        ``/pending`` with ``stripe=coming``): :meth:`coming` names it for
        :data:`STRIPE_LEASE` questions' time more. An address that has not announced, or
        corral's own, is not heard; one that is no member is noted and never named."""
        with self._lock:
            swarm = self._swarms.get(info_hash)
            if swarm is not None and ip in swarm.seen and ip not in swarm.servers:
                swarm.striping[ip] = self.clock()

    def unfinished(self, info_hash: bytes) -> int:
        """Peers in the swarm whose last announce had bytes left: the members still
        downloading, which the nodes that are done linger for (the agent's linger()). A
        node that wants only its stripe says 0 left once it has it, until its next
        announce; the agents also count the members that joined just now (``coming``)."""
        with self._lock:
            swarm = self._swarms.get(info_hash)
            return 0 if swarm is None else len(swarm.peers) - swarm.complete

    def interval_of(self, swarm: _Swarm) -> int:
        """Seconds between two announces of a member of ``swarm``."""
        return max(self.interval, math.ceil(len(swarm.members) / ANNOUNCES_PER_SECOND))

    @staticmethod
    def ask_every(swarm: _Swarm | None) -> float:
        """Seconds between two questions of a member of ``swarm`` to ``/pending``."""
        members = 0 if swarm is None else len(swarm.members)
        return round(max(Latecomers.ASK_EVERY, members / QUESTIONS_PER_SECOND), 1)

    def latecomers(self, info_hash: bytes) -> bytes:
        """The answer to ``/pending/INFOHASH``: :meth:`pending`, :meth:`coming` and
        :meth:`unfinished` as JSON, and how often to ask (``every``, seconds: longer in a
        large swarm, see :data:`QUESTIONS_PER_SECOND`). ``coming`` lists up to every
        member: the answer is made again only when a member came or a second went by, not
        for each node."""
        now = self.clock()
        with self._lock:
            swarm = self._swarms.get(info_hash)
            count = 0 if swarm is None else len(swarm.seen)
            every = self.ask_every(swarm)
            if swarm is not None and swarm.latecomers is not None:
                made, seen, body = swarm.latecomers
                if seen == count and 0 <= now - made < LATECOMERS_FRESH:
                    return body
        answer = {
            "pending": self.pending(info_hash),
            "coming": self.coming(info_hash),
            "unfinished": self.unfinished(info_hash),
            "every": every,
        }
        fresh = json.dumps(answer).encode()
        with self._lock:
            swarm = self._swarms.get(info_hash)
            if swarm is not None:
                swarm.latecomers = (now, count, fresh)
        return fresh

    def _joining(self, info_hash: bytes) -> _Swarm | None:
        """The session's swarm while its members may still join (:data:`JOIN_WINDOW`);
        the caller holds the lock."""
        swarm = self._swarms.get(info_hash)
        if swarm is None or self.clock() - swarm.opened > JOIN_WINDOW:
            return None
        return swarm

    def close(self, info_hash: bytes) -> None:
        with self._lock:
            self._swarms.pop(info_hash, None)

    def __len__(self) -> int:
        return len(self._swarms)

    def announce(self, query: Mapping[str, bytes], ip: str) -> dict[str, Any]:
        """The answer to one announce (BEP 3, compact peers of BEP 23) from ``ip``."""
        try:
            info_hash, peer_id = query["info_hash"], query["peer_id"]
            port = int(query["port"])
            left = int(query.get("left", b"0"))
            numwant = int(query.get("numwant", b"50"))
        except (KeyError, ValueError):
            return {"failure reason": "bad announce: info_hash, peer_id and port are needed"}
        event = query.get("event", b"").decode("ascii", "replace")
        now = self.clock()
        with self._lock:
            swarm = self._swarms.get(info_hash)
            if swarm is None:
                return {"failure reason": "unknown torrent: not a running corral deployment"}
            if swarm.allowed is not None and ip not in swarm.allowed:
                return {"failure reason": f"{ip} is not a member of this deployment"}
            interval = self.interval_of(swarm)
            expired = now - EXPIRE_INTERVALS * interval
            if now - swarm.swept >= SWEEP_EVERY:
                swarm.sweep(expired)
                swarm.swept = now
            if ip not in swarm.seen:
                swarm.seen[ip] = now
                swarm.unseen.discard(ip)
            if event == "stopped":
                swarm.drop(peer_id)
            else:
                swarm.put(peer_id, ip, port, left, now)
            complete = swarm.complete
            incomplete = len(swarm.peers) - complete
            want = max(0, min(numwant, self.max_peers)) if event != "stopped" else 0
            # corral's seed is given no peers: the nodes connect to it when they want it,
            # and keep it away otherwise (see the agent). Anyone else gets peers whatever
            # its "left" says: a node that only wants its stripe yet reports 0 bytes left.
            chosen = [] if ip in swarm.servers else self.choose(swarm, want, ip, port, expired)
        return {
            "interval": interval,
            "min interval": max(1, interval // 2),
            "complete": complete,
            "incomplete": incomplete,
            "peers": b"".join(p.compact for p in chosen),
        }

    def choose(self, swarm: _Swarm, want: int, ip: str, port: int, expired: float) -> list[_Peer]:
        """``want`` peers for the node at ``ip``:``port``: corral's seed, the node's lane
        partners (see :func:`lanes`), then, for a node in a rack, its own rack's peers,
        and for a node in none, anyone, at random; never itself, nor a peer not heard of
        since ``expired``. The caller holds the lock.

        A rack's uplink is oversubscribed. With peers from the whole swarm, every node
        would fetch pieces through it on its own, and it carried the image 9.6 times into
        each of 4 racks at N = 100. With one door per rack, the one node that traded with
        other racks, the door's upload bounded the rack, its idle nodes asked the seed for
        what the door had not brought in yet, and the busiest uplink carried 1.46 x S.
        With lanes every node of a rack brings its share in, from the nodes of the other
        racks that hold it, and trades with its own rack only afterwards."""
        peers, rng = swarm.peers, self.rng

        def fit(key: bytes) -> bool:
            peer = peers[key]
            return peer.seen >= expired and (peer.ip, peer.port) != (ip, port)

        first = [peers[k] for k in swarm.seeds if fit(k)][:want]
        rack = swarm.racks.get(ip)
        bag = swarm.everyone if rack is None else swarm.by_rack.get(rack, _Bag())
        # the lane's partners (14 in 100 racks, 16 in 250); but half the room at most
        # while the rack has peers to fill the rest: partnered with every other rack, a
        # node of 100 racks had 99, who left no room for its own rack
        room = want - len(first)
        lane = _draw(
            rng,
            swarm.partners.get(ip, ()),
            max(room - room // 2, room - len(bag)),
            lambda partner: any(fit(k) for k in swarm.by_ip.get(partner, ())),
        )
        first += [peers[next(k for k in swarm.by_ip[p] if fit(k))] for p in lane]
        taken = {id(p) for p in first}
        rest = _draw(
            rng, bag.keys, want - len(first), lambda k: fit(k) and id(peers[k]) not in taken
        )
        return first + [peers[k] for k in rest]


def _draw(rng: random.Random, items: Sequence[T], need: int, ok: Callable[[T], bool]) -> list[T]:
    """Up to ``need`` of ``items`` that are ``ok``, at random, in time that grows with
    ``need`` rather than with ``items``: a sample a little larger than needed is tried
    first, all of them only when it falls short (few are ok, or few there are)."""
    if need <= 0:
        return []
    if len(items) > 4 * need + 8:
        picked = [x for x in rng.sample(items, 2 * need + 4) if ok(x)]
        if len(picked) >= need:
            return picked[:need]
    pool = [x for x in items if ok(x)]
    return rng.sample(pool, min(need, len(pool)))


def lanes(members: Sequence[str], racks: Mapping[str, str]) -> dict[str, list[int]]:
    """The stripes each member in a rack brings into its rack from elsewhere: its *lane*.

    ``members`` are the session's nodes by stripe (node ``members[g]`` takes stripe ``g``
    from the seed), ``racks`` their racks. A rack's nodes, in stripe order, share the
    stripes of the nodes elsewhere (in stripe order too) in runs of equal length: node
    ``i`` of a rack of ``n`` takes the ``i``-th ``n``-th of them. Each stripe then enters
    each rack once, each node carries about ``S / n`` in and out across its rack's uplink,
    and the rack's swarm has the whole image inside it. Runs, not turns, line the lanes of
    the racks up: a node's stripes are held, in every other rack, by one node or two of
    about the same place (with equal racks in the order of :func:`by_stripe`, node ``i``
    of a rack brings in the stripes of node ``i`` of every other rack), which keeps a
    node's partners few (see :func:`partners`). Members in no rack have no lane."""
    inside: dict[str, list[str]] = {}
    for member in members:
        rack = racks.get(member)
        if rack is not None:
            inside.setdefault(rack, []).append(member)
    out: dict[str, list[int]] = {m: [] for nodes in inside.values() for m in nodes}
    for rack, nodes in inside.items():
        elsewhere = [g for g, owner in enumerate(members) if racks.get(owner) != rack]
        for place, stripe in enumerate(elsewhere):
            out[nodes[place * len(nodes) // len(elsewhere)]].append(stripe)
    return out


def partners(
    members: Sequence[str], lane_of: Mapping[str, Sequence[int]], racks: Mapping[str, str]
) -> dict[str, frozenset[str]]:
    """Each member's lane partners (see :func:`lanes`): the members elsewhere it takes the
    stripes of its lane from, and those that take its own stripes from it.

    A stripe is held by its owner and by one member in each other rack, its importer
    there. Those holders pair along a ring of the racks (in name order), each with the
    holders ``1, 2, 4, ...`` racks away on either side: a stripe reaches every rack in
    about ``log2(R) / 2`` hops, and a node of ``R`` racks has about ``2 log2(R)``
    partners, 16 in 250 racks, rather than all ``R - 1`` (249 connections, with its rack's
    39, past libtorrent's 200 in the agent; and a tracker's answer gives 25 of them).
    An importer takes a stripe from any partner that holds it, the owner or an importer
    nearer to it: each stripe still crosses each rack's uplink once. An owner in no rack
    pairs with the importers ``0, 1, 3, 7, ...`` racks along the ring."""
    inside: dict[str, list[str]] = {}
    for member in lane_of:
        inside.setdefault(racks[member], []).append(member)
    order = sorted(inside)
    count = len(order)
    steps = [1 << k for k in range(max(count - 1, 1).bit_length()) if 1 << k < count]
    # each rack's holder of every stripe (its own stripes' owners, then its importers),
    # and the stripes at which that holder changes: between two changes in both racks of
    # a pair the same two members hold every stripe, so the changes (a rack's few runs,
    # and its own stripes between them) are the only stripes to pair at; 10,000 members
    # in 250 racks are 2.5 million stripe holders, but 120 changes a rack
    holder: list[list[str]] = []
    changes: list[set[int]] = []
    for rack in order:
        held = list(members)
        for member in inside[rack]:
            for stripe in lane_of[member]:
                held[stripe] = member
        holder.append(held)
        changes.append({0, *(g for g in range(1, len(held)) if held[g] != held[g - 1])})
    out: dict[str, set[str]] = {}

    def pair(one: str, other: str) -> None:
        if one and other and one != other:
            out.setdefault(one, set()).add(other)
            out.setdefault(other, set()).add(one)

    for place in range(count):
        for step in steps:
            other = (place + step) % count
            for stripe in changes[place] | changes[other]:
                pair(holder[place][stripe], holder[other][stripe])
    for stripe, owner in enumerate(members):
        if owner not in racks and holder:
            for step in [*steps, count]:
                pair(owner, holder[step - 1][stripe])
    return {m: frozenset(p) for m, p in out.items()}


def _compact(ip: str, port: int) -> bytes:
    try:
        return socket.inet_aton(ip) + port.to_bytes(2, "big")
    except OSError:
        return b""  # BEP 23 compact lists are IPv4; corral's node networks are too


def parse_query(query: str) -> dict[str, bytes]:
    """An announce's query string as raw bytes (info_hash and peer_id are binary)."""
    out: dict[str, bytes] = {}
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            out[urllib.parse.unquote(key)] = urllib.parse.unquote_to_bytes(value)
    return out


class _TrackerHandler(BaseHTTPRequestHandler):
    server: _TrackerServer
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path.startswith("/pending/"):
            self._pending(path.removeprefix("/pending/"), urllib.parse.parse_qs(query))
            return
        if path != "/announce":
            self.send_error(404, "this tracker answers /announce and /pending/INFOHASH")
            return
        answer = self.server.swarms.announce(parse_query(query), self.client_address[0])
        if "failure reason" in answer:
            log.warning("tracker: %s: %s", self.client_address[0], answer["failure reason"])
        body = bencode(answer)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _pending(self, hexdigest: str, query: Mapping[str, list[str]]) -> None:
        """``{"pending": N, "coming": [STRIPE, ...], "unfinished": N, "every": S}``: how
        many members have not joined yet, the stripes still on their way to their members,
        how many peers have bytes left, and how often to ask (not BitTorrent; the agents
        ask it while they download and while they linger). ``?stripe=coming``: the asking
        member's stripe is still on its way to it (:meth:`Swarms.striping`)."""
        try:
            key = bytes.fromhex(hexdigest)
        except ValueError:
            self.send_error(400, "give the info-hash in hex")
            return
        if query.get("stripe") == ["coming"]:
            self.server.swarms.striping(key, self.client_address[0])
        body = self.server.swarms.latecomers(key)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("tracker: %s %s", self.client_address[0], format % args)


class _TrackerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    #: Connections the kernel holds for the accepting thread. socketserver's default, 5,
    #: dropped the SYNs of a hundred nodes announcing within a second (6,793 drops in one
    #: bench call at N = 100): their announces and /pending questions timed out, so the
    #: tracker thought booted members absent. As many as a deployment has nodes, at most
    #: the kernel's somaxconn.
    request_queue_size = 4096
    swarms: Swarms

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that hangs up before its answer (a node leaving gives its tracker one
        second) is no reason for a traceback on corral serve's stderr."""
        log.debug("tracker: %s went away", client_address[0], exc_info=True)


class Tracker:
    """The HTTP tracker of corral's BitTorrent sessions, in a thread of corral serve."""

    def __init__(self, address: str, port: int, swarms: Swarms | None = None) -> None:
        self.swarms = swarms if swarms is not None else Swarms()  # an empty one is falsy
        try:
            self.httpd = _TrackerServer((address, port), _TrackerHandler)
        except OSError as exc:
            raise ConfigError(
                f"the BitTorrent tracker cannot listen on {address}:{port}: {exc.strerror}",
                f"free port {port} (another tracker?) or use another transport",
            ) from None
        self.httpd.swarms = self.swarms
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="corral-tracker",
            daemon=True,
        )
        self.thread.start()
        log.info("BitTorrent tracker on %s:%d", address, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
