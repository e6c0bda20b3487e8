"""The ``chain`` transport: a pipelined TCP relay after Kadeploy's Kascade. The server sends
the image once, to the first node; each node writes every chunk and forwards it to the next.

The server runs the *head*: one TCP listener (:data:`HEAD_PORT` on ``settings.address``,
shared by all sessions and told apart by the session tag) that streams the export's chunk
files. Each node's agent (:mod:`corral.agent.receivers.chain`) listens on
:data:`~corral.agent.wire.chain.RELAY_PORT` and *pulls* from the node before it (the first
node from the head); why pull, and how a dead or slow node is bypassed without restarting
the others, is told there.

Who is before whom: a short barrier, then the order of the nodes that are there
---------------------------------------------------------------------------------

Real machines come up tens of seconds apart (POST and firmware times differ). A chain
fixed in advance by node name then has nodes whose predecessor is not up: they bypass it
to an earlier node, whose one uplink then feeds two successors, and everyone after them
goes at half the rate (a run at 100 nodes took 5.5 x S/B that way). So the chain is
formed from the nodes that are actually there: a node's first plan request proves it up,
and :meth:`ChainTransport.params` answers it (:class:`~corral.deploy.transports.base.NotReady`,
an HTTP 204: the agent asks again a few seconds later) only once the chain is formed:
when every node of the session has asked, or ``chain_max_wait`` seconds (60) after the
first one did, as Kadeploy waits for its nodes before its Kascade step. The nodes there
are chained rack by rack (the ``rack`` variable), in name order within a rack, so that the
stream crosses each rack's uplink once in and once out; one that comes later is appended at
the tail (and so crosses its rack's uplink once more: the price of not restarting anyone).

Why that, and not a chain that appends every node at its tail as it arrives (no wait at
all): a node that joins a chain already flowing starts from chunk 0 while its predecessor
is ahead, and a relay keeps only its last few chunks in memory (the stream is unpacked
as it comes, and a node's RAM is not the image's size), so the head of the image comes
from the server over HTTP for every node that arrives more than that window late. On
the testbed's 2 Mbit/s links the window (32 MiB) is two minutes of stream, and
appending would cost nothing; at 1 Gbit/s it is a quarter of a second, and the server
would send most of the image once per late node: unicast again. Waiting costs the nodes
that came early the time until the last one is up, which no transport can beat anyway:
the last node cannot be served before it is up, so the deployment ends no sooner. It
costs more only when a node never comes (it failed to boot): the others then wait the
full ``chain_max_wait``, as a multicast session does for ``multicast_max_wait``. And an
order decided at one moment can follow something other than arrival: the racks.

Every upstream, a node's relay or the head in one session, feeds one successor at a time
(:class:`~corral.agent.wire.chain_sender.Slot`): a node that passes a dead or slow
upstream says so in its hello, and the node before that hands its slot over to it; the
passed node is refused from then on and finishes from the tail of the chain, or by HTTP.
It never becomes a second successor anywhere.

One listener rather than a port per session: a plan handed to a node names the head's
port, and after a restart of corral serve (sessions are started again, nodes go on with
the plans they have) a fixed port is still the right one. The chain's order lives in
this server's memory: after a restart, the nodes that still ask for a plan are gathered
and chained again among themselves (those with a plan go on with theirs).

:meth:`ChainTransport.params` gives each node::

    session     "DEPLOYMENT/NAME:VERSION/STREAM_SHA256", the tag both ends must agree on
    position    the node's index in members
    members     [[node, ip], ...] the chain as formed so far, in order (ip may be null:
                such a node pulls but cannot be pulled from)
    relay_port  the port every node listens on
    head        [host, port] of the head
    base        http://server/images/NAME/VERSION, for chunks fetched over HTTP

The wire protocol (all integers big-endian), version 2
------------------------------------------------------

A downstream node connects and says hello::

    "CRLY"  u8 version=2  u8 flags  u16 tag length  tag (utf-8)
    u32 index of the first chunk it needs  u32 byte offset in that chunk
    u8 name length  name (utf-8: the logs, and the successor slot)
    with flag 1 (PASSING): u8 length  name of the node it passed to come here

The upstream answers::

    "CRLY"  u8 status  u32 have  u16 length  message (utf-8)

with status 0 ok, 1 wrong session (the tags differ: a node that rejoins from another
deployment or with another image is never served, and never serves), 2 closing (it is done
serving), 3 bad hello, 4 busy (it feeds another successor), 5 passed (the asking node was
passed by its own successor, which took its place here); ``have`` is how many whole
chunks, from the first, the upstream holds. Anything but 0 is followed by the close. After
0, the upstream sends frames and the downstream sends nothing more::

    u8 kind  u32 chunk  u32 offset  u32 length  u32 have  u32 lag  u32 sent  payload[length]

``DATA`` (1)
    bytes ``[offset, offset + length)`` of ``chunk``. Chunks come in order, from the chunk
    and offset of the hello, each then from offset 0, with no gap. A relay forwards a piece
    as soon as it has it (16 KiB pieces; at most 64 KiB in a frame), before its chunk is
    whole and checked; every node checks each whole chunk against the plan's sha256
    before unpacking it.
``SKIP`` (2)
    "the chunks you need before ``chunk`` are no longer here": the downstream fetches them
    from the server over HTTP, and the next ``DATA`` is ``chunk`` from offset 0.
``IDLE`` (3)
    nothing to send for a second: a heartbeat, so that silence means a dead upstream.

``have`` is how many KiB of the stream the sender holds (the answer's ``have`` counts whole
chunks); ``lag`` is how many milliseconds, at its upstream's pace, it fell behind its own
upstream in the last 30 s (0 from the head, and from a node pulling from the head). When
that passes 8 s, the downstream pulls past it (a slow node): a time, the same on any link.
``sent`` is the sender's monotonic clock in milliseconds (modulo 2**32) as it sent the
frame: the receiver takes the sender's pace from ``have`` and ``sent`` together, and counts
in its lag the time frames now spend on their way, queued ahead of a slow link (seconds
at a tenth of the chain's rate, which ``have`` alone would hide). Version 1 had no
``sent``; the two do not talk to each other.

The downstream closes the connection when it holds the whole stream, or to resume
elsewhere: a new connection's hello names the chunk and byte to resume from (the bytes are
the same from any upstream, and the whole chunk is checked once it is in).

A node's upstream that sends nothing, not even its heartbeat, for 10 s, or that does not
answer, is retried for a while, then the node before it, up to the head; a node that
finds nobody fetches that chunk over HTTP and tries again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.agent.wire.chain import RELAY_PORT, Hello, session_tag, tune
from corral.agent.wire.chain_sender import FileSource, Sender, Slot, answer_hello
from corral.config import Settings
from corral.deploy.transports.base import Member, Meter, NotReady, url_host
from corral.errors import ConfigError
from corral.images.exports import Chunked

log = logging.getLogger("corral.deploy")

#: TCP port of the head, on ``settings.address``; one for every session of the server.
HEAD_PORT = 7730


class ChainError(NotReady):
    """A node asked for a chain it is not part of (yet): the manager has not started its
    session (it makes the image's export first); the node asks again."""


@dataclass
class ChainSession:
    """The nodes of one deployment getting one image by chain: those expected, those that
    asked for their plan, and the chain once formed (:meth:`arrive`)."""

    deployment: int
    payload: Chunked
    tag: str
    expected: dict[str, Member]
    sizes: list[int]
    arrived: dict[str, Member] = field(default_factory=dict)
    first_at: float | None = None
    #: the chain in order, once formed (empty until then); late nodes appended
    members: list[Member] = field(default_factory=list)
    formed: bool = False
    senders: list[Sender] = field(default_factory=list)
    #: the head feeds one node of this chain
    slot: Slot = field(default_factory=Slot)

    def position(self, node: str) -> int:
        return next(i for i, m in enumerate(self.members) if m.node == node)

    def arrive(self, node: str, now: float, wait: float) -> bool:
        """``node`` asked for its plan; whether the chain is formed (with it in it).

        Formed when every expected node has asked, or ``wait`` seconds after the first
        did: the nodes there, in name order. A node after that goes at the tail."""
        member = self.expected[node]
        if node not in self.arrived:
            self.arrived[node] = member
            if self.first_at is None:
                self.first_at = now
        if not self.formed:
            assert self.first_at is not None
            if len(self.arrived) < len(self.expected) and now - self.first_at < wait:
                return False
            self.members = order(list(self.arrived.values()))
            self.formed = True
            log.info(
                "chain %s: %d of %d nodes there after %.0f s: %s",
                self.tag,
                len(self.members),
                len(self.expected),
                now - self.first_at,
                " -> ".join(["head", *(m.node for m in self.members)]),
            )
        elif all(m.node != node for m in self.members):
            log.info("chain %s: %s came late: at the tail", self.tag, node)
            self.members.append(member)
        return True


def order(members: Sequence[Member]) -> list[Member]:
    """The order of the nodes there when the chain forms: rack by rack, so that the stream
    enters each rack once and leaves it once (through its uplink), and by name within a
    rack. Racks come in the order of their first node's name; the nodes in no rack are one
    more such run."""
    by_name = sorted({m.node: m for m in members}.values(), key=lambda m: m.node)
    runs: dict[str | None, list[Member]] = {}
    for member in by_name:
        runs.setdefault(member.rack, []).append(member)
    return [member for run in runs.values() for member in run]


def chunk_sizes(index: dict[str, Any]) -> list[int]:
    size, total = int(index["chunk_size"]), int(index["size"])
    return [min(size, total - i * size) for i in range(len(index["chunks"]))]


class Head:
    """The head of every chain: one listener; each connection is served from the chunk
    files of its session, in a thread of its own."""

    def __init__(self, address: str, port: int, transport: ChainTransport) -> None:
        self.transport = transport
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune(self.sock)
        try:
            self.sock.bind((address if address not in ("", "0.0.0.0") else "", port))
            self.sock.listen(64)
        except OSError as exc:
            self.sock.close()
            hint = "stop what holds it" if exc.errno == errno.EADDRINUSE else ""
            raise ConfigError(
                f"the chain head cannot listen on {address or '*'}:{port}: {exc.strerror}",
                hint or "check 'address' in corral.toml",
            ) from None
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="corral-chain-head", daemon=True)
        self._thread.start()
        log.info("chain head listening on port %d", self.port)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.2)
                if not ready:
                    continue
                conn, peer = self.sock.accept()
            except (OSError, ValueError):
                return
            threading.Thread(
                target=self._serve, args=(conn, peer[0]), name="corral-chain-out", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        transport = self.transport
        try:
            tune(conn)
            hello = answer_hello(conn, transport.have_for, admit=transport.admit)
        except OSError:
            hello = None
        session = transport.session(hello.tag) if hello is not None else None
        if hello is None or session is None:
            conn.close()
            return
        source = FileSource(session.payload.chunk_path, session.sizes)
        sender = Sender(
            conn, source, session.sizes, hello.index, f"{hello.name} ({peer})", offset=hello.offset
        )
        with transport.lock:
            session.senders.append(sender)
            transport.serving.append((session.payload.ref, sender))
        session.slot.attach(hello.name, sender)
        log.info(
            "chain %s: the head serves %s from chunk %d",
            session.tag,
            sender.peer,
            hello.index,
        )
        try:
            sender.run()
        finally:
            with transport.lock:
                with contextlib.suppress(ValueError):
                    session.senders.remove(sender)
                transport.serving.remove((session.payload.ref, sender))
                transport.meter.add(session.payload.ref, sender.sent)
        log.info(
            "chain %s: %s %s after %d bytes from the head%s",
            session.tag,
            sender.peer,
            "has everything" if sender.complete else "left",
            sender.sent,
            f" ({sender.error})" if sender.error else "",
        )

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(2)


class ChainTransport:
    name = "chain"
    export = "stream"

    def __init__(
        self,
        settings: Settings,
        head_port: int = HEAD_PORT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = settings.address
        self.wait = float(settings.chain_max_wait)
        self.clock = clock
        self.head_host = url_host(settings.server_url)
        self.server = settings.server_url.rstrip("/")
        self.head_port = head_port
        self.relay_port = RELAY_PORT
        self.lock = threading.Lock()
        self.sessions: dict[str, ChainSession] = {}  # by tag
        self.by_node: dict[str, str] = {}  # node -> tag of its session
        self.head: Head | None = None
        self._checked: set[str] = set()
        #: the head's connections (export ref, sender) and what the ended ones sent
        self.serving: list[tuple[str, Sender]] = []
        self.meter = Meter()

    def prepare(self, payload: Chunked) -> None:
        """Check every chunk against the manifest once, before the first byte is served."""
        if payload.ref not in self._checked:
            payload.verify()
            self._checked.add(payload.ref)

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None:
        index = payload.index()
        tag = session_tag(deployment, payload.ref, str(index["sha256"]))
        expected = {m.node: m for m in members}
        session = ChainSession(deployment, payload, tag, expected, chunk_sizes(index))
        with self.lock:
            if self.head is None:
                self.head = Head(self.address, self.head_port, self)
                self.head_port = self.head.port
            old = self.sessions.get(tag)
            if old is not None:  # the same session again: keep what it knows
                session = old
                session.expected.update(expected)
            self.sessions[tag] = session
            for node in expected:
                self.by_node[node] = tag
        log.info(
            "chain %s: %d nodes; it forms when all have asked for their plan, or %.0f s "
            "after the first",
            tag,
            len(session.expected),
            self.wait,
        )

    def session(self, tag: str) -> ChainSession | None:
        with self.lock:
            return self.sessions.get(tag)

    def admit(self, hello: Hello) -> tuple[int, str] | None:
        """The head feeds one node per chain (see :class:`Slot`)."""
        session = self.session(hello.tag)
        return None if session is None else session.slot.claim(hello)

    def have_for(self, tag: str) -> int | None:
        """The head holds every chunk of the sessions it runs, and nothing of others."""
        session = self.session(tag)
        return None if session is None else len(session.sizes)

    def params(self, payload: Chunked, node: str) -> dict[str, Any]:
        with self.lock:
            session = self.sessions.get(self.by_node.get(node, ""))
            if session is None or session.payload.ref != payload.ref:
                raise ChainError(
                    f"node {node} is in no chain session for {payload.ref} yet",
                    "the deploy manager starts sessions every second: the agent asks again",
                )
            if not session.arrive(node, self.clock(), self.wait):
                raise NotReady(
                    f"chain {session.tag}: {len(session.arrived)} of "
                    f"{len(session.expected)} nodes there; it forms when all are, or "
                    f"{self.wait:.0f} s after the first"
                )
            position = session.position(node)
            members = [[m.node, m.ip] for m in session.members]
        return {
            "session": session.tag,
            "position": position,
            "members": members,
            "relay_port": self.relay_port,
            "head": [self.head_host, self.head_port],
            "base": f"{self.server}{payload.url_path}",
        }

    def finish(self, deployment: int, payload: Chunked) -> None:
        with self.lock:
            ended = [
                s
                for s in self.sessions.values()
                if s.deployment == deployment and s.payload.ref == payload.ref
            ]
            for session in ended:
                del self.sessions[session.tag]
                for node in session.expected:
                    if self.by_node.get(node) == session.tag:
                        del self.by_node[node]
            senders = [sender for s in ended for sender in s.senders]
        for sender in senders:
            with contextlib.suppress(OSError):
                sender.sock.shutdown(socket.SHUT_RDWR)

    def sent(self) -> dict[str, int]:
        """What the head sent the first node of each chain (the nodes relay the rest)."""
        with self.lock:
            return self.meter.read(*((ref, sender.sent) for ref, sender in self.serving))

    def close(self) -> None:
        with self.lock:
            head, self.head = self.head, None
            senders = [sender for s in self.sessions.values() for sender in s.senders]
            self.sessions.clear()
            self.by_node.clear()
        for sender in senders:
            with contextlib.suppress(OSError):
                sender.sock.shutdown(socket.SHUT_RDWR)
        if head is not None:
            head.close()
