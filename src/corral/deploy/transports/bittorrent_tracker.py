"""The ``bittorrent`` transport's tracker (:class:`Tracker`): a tiny HTTP tracker on its
own port, stdlib ``http.server`` in a thread of corral serve, that hands each node the
session's other members (:class:`Swarms`) and tells the nodes done first how many members
have not joined yet. See :mod:`corral.deploy.transports.bittorrent`."""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from corral.agent.wire.bencode import bencode
from corral.errors import ConfigError

log = logging.getLogger("corral.deploy")
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
#: A peer not heard of for this many intervals has left.
EXPIRE_INTERVALS = 3
#: Seconds after a session starts during which the nodes that are done wait for members
#: that have not joined yet (see :meth:`Swarms.pending`). On the virtual cluster, 50 nodes
#: power-cycled 8 at a time reach the swarm over about 65 s.
JOIN_WINDOW = 180.0
#: Seconds after a member's first announce during which its stripe is still its own to
#: take from the seed (see :meth:`Swarms.coming`): the agent gives its stripe up after 20 s
#: (its STRIPE_TIMEOUT), and at N = 100 the seed's 20 Mbit/s send the stripes in 10 s or
#: more. Rescued by the others before, those pieces went out from the seed once per node
#: in need: at a start skew of 30 s, 1.8-2.0 x S from the seed, against 1.15 x S without.
STRIPE_GRACE = 20.0


@dataclass
class _Peer:
    ip: str
    port: int
    left: int
    seen: float


@dataclass
class _Swarm:
    allowed: frozenset[str] | None  # None: any address
    members: tuple[str, ...]  # the nodes' addresses by stripe ("": not known; none: unknown)
    servers: frozenset[str]  # corral's own addresses: its seed announces from one
    racks: Mapping[str, str]  # a node's address -> its rack, for the nodes in one
    peers: dict[bytes, _Peer] = field(default_factory=dict)  # peer_id -> peer
    seen: dict[str, float] = field(default_factory=dict)  # address -> its first announce
    opened: float = 0.0
    partners: Mapping[str, frozenset[str]] = field(default_factory=dict)  # see lanes()


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
        # the lanes are millions of steps
        pairs = partners(members, lanes(members, racks or {}))
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
            )

    def pending(self, info_hash: bytes) -> int:
        """Members that have not joined the swarm yet: nodes still booting, which will need
        pieces soon. The nodes that are done linger for them (see the agent's linger()).
        After :data:`JOIN_WINDOW` seconds a member that has not come is not waited for
        (its power-on failed; the deployment fails it after its boot timeout)."""
        with self._lock:
            swarm = self._joining(info_hash)
            if swarm is None:
                return 0
            return sum(1 for ip in swarm.members if ip and ip not in swarm.seen)

    def coming(self, info_hash: bytes) -> list[int]:
        """The stripes (positions in ``members``) still on their way to their members:
        members that have not joined yet (within :data:`JOIN_WINDOW`, as :meth:`pending`),
        or joined less than :data:`STRIPE_GRACE` seconds ago. The nodes there leave those
        pieces to them (the agent's ``SeedUse``): each member takes its own stripe from
        the seed, once, and passes it on."""
        with self._lock:
            swarm, now = self._joining(info_hash), self.clock()
            if swarm is None:
                return []
            return [
                i
                for i, ip in enumerate(swarm.members)
                if ip and now - swarm.seen.get(ip, now) < STRIPE_GRACE
            ]

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
            expired = now - EXPIRE_INTERVALS * self.interval
            for key in [k for k, p in swarm.peers.items() if p.seen < expired]:
                del swarm.peers[key]
            swarm.seen.setdefault(ip, now)
            if event == "stopped":
                swarm.peers.pop(peer_id, None)
            else:
                swarm.peers[peer_id] = _Peer(ip, port, left, now)
            # corral's seed is given no peers: the nodes connect to it when they want it,
            # and keep it away otherwise (see the agent). Anyone else gets peers whatever
            # its "left" says: a node that only wants its stripe yet reports 0 bytes left.
            others = [
                p
                for k, p in swarm.peers.items()
                if ip not in swarm.servers and k != peer_id and (p.ip, p.port) != (ip, port)
            ]
            complete = sum(1 for p in swarm.peers.values() if p.left == 0)
            incomplete = len(swarm.peers) - complete
            racks, servers = swarm.racks, swarm.servers
            mine = swarm.partners.get(ip, frozenset())
        want = max(0, min(numwant, self.max_peers)) if event != "stopped" else 0
        chosen = self.choose(others, want, racks, racks.get(ip), servers, mine)
        return {
            "interval": self.interval,
            "min interval": max(1, self.interval // 2),
            "complete": complete,
            "incomplete": incomplete,
            "peers": b"".join(_compact(p.ip, p.port) for p in chosen),
        }

    def choose(
        self,
        others: list[_Peer],
        want: int,
        racks: Mapping[str, str],
        rack: str | None,
        servers: frozenset[str] = frozenset(),
        partners: frozenset[str] = frozenset(),
    ) -> list[_Peer]:
        """``want`` of ``others``: corral's seed, the node's lane ``partners`` (see
        :func:`lanes`), then, for a node in a rack, its own rack's peers, and for a node
        in none, anyone, at random.

        A rack's uplink is oversubscribed. With peers from the whole swarm, every node
        would fetch pieces through it on its own, and it carried the image 9.6 times into
        each of 4 racks at N = 100. With one door per rack, the one node that traded with
        other racks, the door's upload bounded the rack, its idle nodes asked the seed for
        what the door had not brought in yet, and the busiest uplink carried 1.46 x S.
        With lanes every node of a rack brings its share in, from the nodes of the other
        racks that hold it, and trades with its own rack only afterwards."""
        first = [p for p in others if p.ip in servers][:want]
        lane = [p for p in others if p.ip in partners]  # all of them, over a few announces
        first += self.rng.sample(lane, max(0, min(want - len(first), len(lane))))
        taken = {id(p) for p in first}
        pool = [
            p
            for p in others
            if id(p) not in taken
            and p.ip not in servers
            and (rack is None or racks.get(p.ip) == rack)
        ]
        return first + self.rng.sample(pool, max(0, min(want - len(first), len(pool))))


def lanes(members: Sequence[str], racks: Mapping[str, str]) -> dict[str, list[int]]:
    """The stripes each member in a rack brings into its rack from elsewhere: its *lane*.

    ``members`` are the session's nodes by stripe (node ``members[g]`` takes stripe ``g``
    from the seed), ``racks`` their racks. A rack's nodes, in stripe order, take the
    stripes of the nodes elsewhere (in stripe order too) in turn: with equal racks, node
    ``i`` of a rack brings in the stripes of node ``i`` of every other rack. Each stripe
    then enters each rack once, each node carries about ``S / n`` (a rack of ``n``) in
    and out across its rack's uplink, and the rack's swarm has the whole image inside it.
    Members in no rack have no lane."""
    inside: dict[str, list[str]] = {}
    for member in members:
        rack = racks.get(member)
        if rack is not None:
            inside.setdefault(rack, []).append(member)
    out: dict[str, list[int]] = {m: [] for nodes in inside.values() for m in nodes}
    turn = dict.fromkeys(inside, 0)
    for stripe, owner in enumerate(members):
        for rack, nodes in inside.items():
            if racks.get(owner) != rack:
                out[nodes[turn[rack] % len(nodes)]].append(stripe)
                turn[rack] += 1
    return out


def partners(
    members: Sequence[str], lane_of: Mapping[str, Sequence[int]]
) -> dict[str, frozenset[str]]:
    """Each member's lane partners, from the lanes (:func:`lanes`): the members whose
    stripes it brings into its rack, and those that bring its own into theirs."""
    out: dict[str, set[str]] = {}
    for member, lane in lane_of.items():
        for stripe in lane:
            owner = members[stripe]
            if owner and member:
                out.setdefault(member, set()).add(owner)
                out.setdefault(owner, set()).add(member)
    return {m: frozenset(p) for m, p in out.items()}


def _compact(ip: str, port: int) -> bytes:
    address = ipaddress.ip_address(ip)
    if address.version != 4:
        return b""  # BEP 23 compact lists are IPv4; corral's node networks are too
    return address.packed + port.to_bytes(2, "big")


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
            self._pending(path.removeprefix("/pending/"))
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

    def _pending(self, hexdigest: str) -> None:
        """``{"pending": N, "coming": [STRIPE, ...]}``: how many members have not joined
        yet, and the stripes still on their way to their members (not BitTorrent; the
        agents ask it while they download and while they linger)."""
        try:
            key = bytes.fromhex(hexdigest)
        except ValueError:
            self.send_error(400, "give the info-hash in hex")
            return
        swarms = self.server.swarms
        body = json.dumps({"pending": swarms.pending(key), "coming": swarms.coming(key)}).encode()
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
