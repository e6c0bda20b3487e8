"""The ``chain`` receiver: the image flows from node to node over TCP, as in Kadeploy's
Kascade, so the server sends it about once whatever the number of nodes.

The wire protocol and the server's side (the head of the chain) are described in
:mod:`corral.deploy.chain`; the code of both ends is here, because the agent is stdlib-only
and cannot import the server's modules (the server imports this one).

What one node does, in :meth:`ChainReceiver.receive`:

- it listens on :data:`RELAY_PORT` for nodes after it (:class:`Relay`);
- it connects *upstream* (:class:`Picker`): to the node just before it, or to the head for
  the first node, says which chunk it needs next, and reads pieces of chunks;
- every piece is put in a :class:`Window` as it arrives and forwarded at once to whoever
  pulls from this node (cut-through: a hop costs one 16 KiB piece, not a 4 MiB chunk, so
  a hundred hops add about a second, not minutes); a whole chunk is checked against the
  plan's sha256 before a byte of it is unpacked, and a node that pulled a corrupt piece
  finds out the same way;
- it feeds the checked chunks to ``zstd -d | tar -x`` (:class:`~corral.agent.receive.Unpacker`).

Why nodes pull (connect upstream) rather than push: a node's recovery is then its own
decision, made with the one fact that matters, the next chunk *it* needs, which it says in
its hello; no upstream has to find out that its successor died and which node should
take its place, and a node whose upstream died does not wait for someone to come. Nodes
are ordered by name and a node only ever pulls from a node before it (or the head), so
the lists a server hands out before and after a restart can never make a cycle.

Failures, without restarting anyone:

- the upstream drops, or goes silent for :data:`SILENCE` seconds (it sends a heartbeat
  every second while it has nothing): the node tries it again for
  :data:`RECONNECT_GRACE` seconds, then pulls from the node before it, and so on up to the
  head (a node before that does not answer at once is passed at once: it died or has
  finished and gone; after :data:`MAX_WALK` of those, the head); the one it reaches
  resumes from the chunk and byte the hello names. A direct predecessor that has not
  started listening yet gets :data:`START_PATIENCE` seconds (nodes boot at slightly
  different times) before it is bypassed;
- the upstream no longer holds the chunk it needs (a relay keeps the last
  :data:`WINDOW_CHUNKS` chunks in memory, since what is unpacked is gone): it says so
  (``SKIP``) and the node fetches the gap from the server over HTTP
  (:meth:`~corral.agent.receive.StreamReceiver.fetch_chunk`, checked), then goes on
  reading from the same upstream;
- the upstream says it fell behind its own upstream by :data:`LAG_BYTES` and
  :data:`LAG_SECONDS` of this node's rate (a slow node): the node pulls from the node
  before it instead, so one slow node does not slow everyone after it;
- the head cannot be reached either: one chunk over HTTP, then the head again.

When a node has the whole image it keeps serving until the node after it has everything
too, or nobody came or was served for :data:`DRAIN_IDLE` seconds, then closes its relay;
it waits for that up to :data:`LINGER` seconds, then goes on with its install while the
relay serves on in the background (as long as the agent runs: its exit waits for it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.agent.plan import Plan
from corral.agent.receive import (
    Cancelled,
    Context,
    ProgressCallback,
    Received,
    ReceiveError,
    StreamReceiver,
    VerifiedStream,
    register,
)
from corral.agent.wire.chain import (
    DATA,
    FRAME,
    HEARTBEAT,
    HELLO_TIMEOUT,
    IDLE,
    OK,
    PIECE,
    SILENCE,
    SKIP,
    STATUS_TEXT,
    Closed,
    Gone,
    ProtocolError,
    pack_hello,
    read_answer,
    read_exact,
    tune,
)
from corral.agent.wire.chain_sender import Sender, answer_hello

log = logging.getLogger("corral.agent")

#: Whole chunks a relay keeps for nodes that (re)connect behind it: 8 x 4 MiB = 32 MiB of
#: the node's RAM, 13 s of data at 20 Mbit/s, enough for a bypassing node to resume.
WINDOW_CHUNKS = 8
#: For a connection to an upstream. Long: the node is busy receiving, its download link is
#: full and drops SYNs, retried after 1, 3 and 7 s (at 3 s, nodes alive were passed for
#: dead and a node behind a slow one walked all the way to the head). A dead process
#: refuses at once, and a powered-off machine fails its ARP in 3 s.
CONNECT_TIMEOUT = 10.0
#: How long a node waits for its direct predecessor to start listening before bypassing it
#: (on the testbed at 50 nodes and 92% host CPU, a node started at most 4 s after the one
#: after it; a node that never starts costs those after it this long).
START_PATIENCE = 12.0
#: How long an upstream that answered and then dropped is tried again before it is bypassed
#: (a dead process refuses at once; this is for a blip of the network).
RECONNECT_GRACE = 1.5
#: Nodes passed in a row without reaching one before a node goes straight to the head (a
#: powered-off node costs a connect timeout; nodes that finished have gone away).
MAX_WALK = 4
#: Pause between two connection attempts to the same upstream.
RETRY_DELAY = 0.5
#: A node with the whole image closes its relay after this long without a successor
#: connecting or being served, counted from the moment it had it all (longer than
#: START_PATIENCE: a successor may still be waiting for a dead node between us).
DRAIN_IDLE = 20.0
#: How long :meth:`ChainReceiver.receive` itself waits for that before it returns (the
#: node right behind is milliseconds behind); past it, the relay goes on serving from a
#: thread of its own, so that a slow successor never holds up this node's install.
LINGER = 5.0
#: An upstream that fell this far behind its own upstream since it connected to it is a
#: slow node: pull past it (see :class:`LagWatch`: a node that started late, or just
#: changed upstream, is behind but not slow, and passing it would only share out the
#: uplink of the node before it, every node after it doing the same). At least
#: ``LAG_BYTES``, and at least ``LAG_SECONDS`` of what this node receives, so that a stall
#: of a second or two on a fast link passes nobody: behind a node at 2 Mbit/s on 20 Mbit/s
#: links, a node leaves it after about 2 s.
LAG_BYTES = 4 << 20
LAG_SECONDS = 3.0
#: Checked chunks waiting for ``zstd -d | tar -x`` (unpacked from a thread of their own, so
#: that the socket is read meanwhile: a 4 MiB write into the pipe takes long enough to
#: stall the link, and every node after this one with it). With the window, a node holds
#: up to (8 + 4 + 1) x 4 MiB = 52 MiB of the stream in RAM.
UNPACK_QUEUE = 4


class Silent(ConnectionError):
    """The other side sent nothing, not even a heartbeat, for too long."""


class Window:
    """A relay's memory of the stream: the last ``keep`` whole, checked chunks, and the
    pieces of the chunk arriving now (forwarded before it is checked; each node checks for
    itself). Chunks arrive in order; everything below :attr:`have` was checked."""

    def __init__(self, sizes: list[int], keep: int = WINDOW_CHUNKS) -> None:
        self.sizes = sizes
        self.starts = [0]
        for size in sizes:
            self.starts.append(self.starts[-1] + size)
        self.keep = max(1, keep)
        self.cond = threading.Condition()
        self.chunks: dict[int, bytes] = {}
        self._have = 0
        self.partial = bytearray()
        self.lag = 0  # see LagWatch: what this node tells the nodes after it
        self.closed = False

    @property
    def have(self) -> int:
        return self._have

    @property
    def held_kib(self) -> int:
        """KiB of the stream this node holds: the whole chunks and the one arriving."""
        return (self.starts[self._have] + len(self.partial)) >> 10

    @property
    def low(self) -> int:
        return min(self.chunks) if self.chunks else self._have

    def restart(self) -> None:
        """The chunk arriving starts again from its first byte (a new upstream, or a chunk
        that did not match). Senders ahead in it wait until it is back where they are:
        the bytes are the same."""
        with self.cond:
            self.partial = bytearray()

    def extend(self, data: bytes) -> None:
        with self.cond:
            self.partial += data
            self.cond.notify_all()

    def complete(self, index: int, data: bytes) -> None:
        """Chunk ``index`` (the next one) arrived whole and matched."""
        with self.cond:
            if index != self._have:
                raise ValueError(f"chunk {index} completed while chunk {self._have} was due")
            self.chunks[index] = data
            self._have = index + 1
            self.partial = bytearray()
            for old in [k for k in self.chunks if k < self._have - self.keep]:
                del self.chunks[old]
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def read(self, index: int, offset: int, size: int, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self.closed:
                    raise Closed()
                if index < self.low:
                    raise Gone(self.low)
                if index in self.chunks:
                    return self.chunks[index][offset : offset + size]
                if index == self._have and len(self.partial) > offset:
                    return bytes(self.partial[offset : offset + size])
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


# --- the node's relay ---------------------------------------------------------------


class Relay:
    """This node's listener: serves whoever comes after it in the chain from the window."""

    def __init__(
        self,
        address: tuple[str, int],
        tag: str,
        window: Window,
        *,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.tag = tag
        self.window = window
        self.heartbeat = heartbeat
        self.senders: list[Sender] = []
        self.closing = False
        self.last_event = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sock: socket.socket | None = self._listen(address)
        self._thread = threading.Thread(target=self._accept, name="corral-relay", daemon=True)

    @staticmethod
    def _listen(address: tuple[str, int]) -> socket.socket | None:
        """A listening socket on this node's address (any address if that one is not
        ours: a DHCP lease may differ from the inventory); None if the port is taken,
        and then the nodes after this one pull past it."""
        for host in dict.fromkeys((address[0], "")):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tune(sock)
            try:
                sock.bind((host, address[1]))
                sock.listen(16)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRNOTAVAIL:
                    log.warning("chain: cannot listen on port %d: %s", address[1], exc)
                    return None
        return None

    def start(self) -> None:
        if self.sock is not None:
            self._thread.start()

    def _accept(self) -> None:
        sock = self.sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 0.2)
                if not ready:
                    continue
                conn, peer = sock.accept()
            except (OSError, ValueError):
                return
            threading.Thread(
                target=self._serve, args=(conn, peer[0]), name="corral-relay-out", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            tune(conn)
            hello = answer_hello(conn, self._have_for, self.closing)
        except OSError:
            hello = None
        if hello is None:
            conn.close()
            return
        sender = Sender(
            conn, self.window, self.window.sizes, hello.index, f"{hello.name} ({peer})",
            offset=hello.offset, heartbeat=self.heartbeat,
        )  # fmt: skip
        with self._lock:
            if self.closing:
                conn.close()
                return
            self.senders.append(sender)
            self.last_event = time.monotonic()
        log.info("chain: serving %s from chunk %d (+%d)", sender.peer, hello.index, hello.offset)
        sender.run()
        log.info(
            "chain: %s %s after %d bytes%s",
            sender.peer,
            "has everything" if sender.complete else "left",
            sender.sent,
            f" ({sender.error})" if sender.error else "",
        )

    def _have_for(self, tag: str) -> int | None:
        return self.window.have if tag == self.tag else None

    @property
    def served(self) -> int:
        with self._lock:
            return sum(s.sent for s in self.senders)

    def drained(self, is_last: bool, idle: float) -> bool:
        """Whether this node, holding the whole image, may stop serving: nobody is being
        served (a downstream that took nothing for ``idle`` seconds no longer counts) and
        someone got everything from it, or it is last in the chain, or nothing happened
        for ``idle`` seconds."""
        if self.sock is None:
            return True
        now = time.monotonic()
        with self._lock:
            if any(not s.done.is_set() and now - s.last_progress < idle for s in self.senders):
                return False
            latest = max([self.last_event, *(s.last_progress for s in self.senders)])
            complete = any(s.complete for s in self.senders)
        return is_last or complete or now - latest >= idle

    def finished(self) -> None:
        """This node holds the whole image: the idle time of :meth:`drained` counts from now."""
        with self._lock:
            self.last_event = time.monotonic()

    def drain(
        self, cancel: threading.Event, is_last: bool, idle: float = DRAIN_IDLE, limit: float = 0
    ) -> bool:
        """Wait until :meth:`drained` (at most ``limit`` seconds if given); whether it is."""
        deadline = time.monotonic() + limit if limit else None
        while not self.drained(is_last, idle):
            if cancel.wait(0.2) or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def close_when_drained(self, is_last: bool, idle: float = DRAIN_IDLE) -> None:
        """Serve on from a thread of this relay's own, and close once drained.

        The thread is not a daemon: an agent that exits after its install (its final
        report sent) waits for it, and one that reboots or powers off the node waits for
        it up to a minute (``corral.agent.main.serving_others``), so a successor still
        pulling is not cut off; past that it pulls from further up the chain."""

        def wait_then_close() -> None:
            self.drain(threading.Event(), is_last, idle)
            log.info("chain: relay closed after serving %d bytes", self.served)
            self.close()

        threading.Thread(target=wait_then_close, name="corral-relay-end", daemon=False).start()

    def close(self) -> None:
        with self._lock:
            self.closing = True
            senders = list(self.senders)
        self._stop.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.window.close()
        for sender in senders:
            with contextlib.suppress(OSError):
                sender.sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(2)


# --- choosing the upstream ----------------------------------------------------------


@dataclass
class Upstream:
    name: str
    address: tuple[str, int]
    head: bool = False


class Picker:
    """Which upstream to pull from: the nearest node before this one that works, else the
    head, else (for one chunk at a time) HTTP.

    ``chain`` is nearest first and ends with the head. How long a candidate that refuses
    or drops is tried again before it is passed:

    - the direct predecessor before it ever answered: ``start_patience`` (it may still be
      booting);
    - a candidate that answered us before (it started, so it died, or it finished and
      left): ``grace``, in case the drop was a blip;
    - any other node: not at all (it died or finished: nodes do not start late, the
      direct predecessor aside). After ``max_walk`` of those in a row, the head.

    There is no way back: a node that died rarely returns in time to matter, and one that
    returns starts from the beginning, behind us.
    """

    def __init__(
        self,
        chain: list[Upstream],
        *,
        start_patience: float = START_PATIENCE,
        grace: float = RECONNECT_GRACE,
        max_walk: int = MAX_WALK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not chain or not chain[-1].head:
            raise ValueError("the chain of upstreams must end with the head")
        self.chain = chain
        self.start_patience = start_patience
        self.grace = grace
        self.max_walk = max_walk
        self.clock = clock
        self.index = 0
        self.since: float | None = None
        self.contact = chain[0].head  # the current candidate answered us once
        self.walked = 0
        self.http_once = False
        self.switches = 0

    def current(self) -> Upstream | None:
        """Whom to connect to now; None: fetch the next chunk over HTTP."""
        return None if self.http_once else self.chain[self.index]

    def farther(self) -> Upstream | None:
        """The node a lagging upstream would be passed for (never the head: pulling from
        it doubles what the server sends)."""
        nxt = self.chain[self.index + 1] if self.index + 1 < len(self.chain) else None
        return nxt if nxt is not None and not nxt.head else None

    def answered(self) -> None:
        """The current candidate accepted the connection: it has started."""
        self.contact = True
        self.walked = 0

    def succeeded(self) -> None:
        """The current upstream delivered a whole chunk: its next failure is a new one."""
        self.answered()
        self.since = None

    def failed(self, *, fatal: bool = False) -> bool:
        """The current upstream refused, dropped or went silent; True if it is passed."""
        now = self.clock()
        if self.since is None:
            self.since = now
        if self.contact:
            patience = self.grace
        elif self.index == 0:
            patience = self.start_patience
        else:
            patience = 0.0
        if fatal or now - self.since >= patience:
            self._advance()
            return True
        return False

    def pass_lagging(self) -> None:
        """The current upstream is a slow node: pull from the one before it."""
        if self.farther() is not None:
            self._advance()

    def after_http(self) -> None:
        self.http_once = False

    def _advance(self) -> None:
        if self.chain[self.index].head:
            self.http_once = True
        else:
            self.walked = 0 if self.contact else self.walked + 1
            self.index += 1
            if self.walked >= self.max_walk:
                self.index = len(self.chain) - 1
            self.switches += 1
            self.contact = self.chain[self.index].head
        self.since = None


# --- the receiver -------------------------------------------------------------------


@dataclass(frozen=True)
class ChainParams:
    """The plan's ``transport.params`` for ``chain`` (made by :mod:`corral.deploy.chain`)."""

    session: str
    position: int
    members: list[tuple[str, str | None]]
    relay_port: int
    head: tuple[str, int]
    base: str

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ChainParams:
        try:
            members = [(str(m[0]), None if m[1] is None else str(m[1])) for m in params["members"]]
            head = params["head"]
            value = cls(
                session=str(params["session"]),
                position=int(params["position"]),
                members=members,
                relay_port=int(params["relay_port"]),
                head=(str(head[0]), int(head[1])),
                base=str(params["base"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ReceiveError(f"transport chain: bad parameters in the plan: {exc}") from None
        if not 0 <= value.position < len(members):
            raise ReceiveError(
                f"transport chain: position {value.position} in a chain of {len(members)}"
            )
        return value

    @property
    def me(self) -> tuple[str, str | None]:
        return self.members[self.position]

    @property
    def is_last(self) -> bool:
        return self.position == len(self.members) - 1

    def upstreams(self) -> list[Upstream]:
        """The nodes before this one, nearest first (those with an address), then the head."""
        chain = [
            Upstream(name, (ip, self.relay_port))
            for name, ip in reversed(self.members[: self.position])
            if ip
        ]
        return [*chain, Upstream("head", self.head, head=True)]


class LagWatch:
    """How far a node fell behind its upstream since it connected to it: the growth of
    ``what the upstream holds - what we hold`` above the least it was. The growth, not the lag:
    a node that started late, or that just moved to an upstream further ahead, lags as
    much as that and no more, and is as fast as any; a slow node's lag grows."""

    def __init__(self) -> None:
        self.least: int | None = None

    def growth(self, upstream_holds: int, holds: int) -> int:
        lag = upstream_holds - holds
        self.least = lag if self.least is None else min(self.least, lag)
        return lag - self.least


class _Switch(Exception):
    """Stop reading this upstream (at a chunk boundary) and pick again."""

    def __init__(
        self, why: str, *, failure: bool, fatal: bool = False, lagging: bool = False
    ) -> None:
        super().__init__(why)
        self.failure = failure
        self.fatal = fatal
        self.lagging = lagging


@dataclass
class _State:
    """What one receive has done so far."""

    stream: VerifiedStream
    #: the bytes of chunk ``next`` so far: kept across upstreams (the bytes are the same)
    partial: bytearray = field(default_factory=bytearray)
    from_relay: int = 0
    from_http: int = 0
    bad: int = 0
    skips: int = 0
    lag_passes: int = 0

    @property
    def next(self) -> int:
        """The first chunk not yet unpacked."""
        return self.stream.index

    @property
    def done(self) -> int:
        return self.stream.done


@register
class ChainReceiver(StreamReceiver):
    """Pulls the stream from the node before it, forwards it to the node after it."""

    name = "chain"

    # knobs, as attributes so that the tests can make them short
    window_chunks = WINDOW_CHUNKS
    heartbeat = HEARTBEAT
    silence = SILENCE
    start_patience = START_PATIENCE
    grace = RECONNECT_GRACE
    drain_idle = DRAIN_IDLE
    linger = LINGER
    lag_bytes = LAG_BYTES
    lag_seconds = LAG_SECONDS
    unpack_queue = UNPACK_QUEUE

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.picker: Picker | None = None
        self.relay: Relay | None = None

    def receive(
        self,
        plan: Plan,
        target_dir: Path,
        progress_callback: ProgressCallback,
        cancel_event: threading.Event,
    ) -> Received:
        params = ChainParams.from_dict(plan.transport.params)
        image = plan.image
        sizes = [c.size for c in image.chunks]
        window = Window(sizes, self.window_chunks)
        name, ip = params.me
        self.relay = relay = Relay(
            (ip or "", params.relay_port), params.session, window, heartbeat=self.heartbeat
        )
        relay.start()
        self.picker = Picker(
            params.upstreams(), start_patience=self.start_patience, grace=self.grace
        )
        log.info(
            "chain: %s is %d of %d in session %s",
            name,
            params.position + 1,
            len(params.members),
            params.session,
        )
        states: list[_State] = []

        def fill(stream: VerifiedStream) -> None:
            states.append(_State(stream))
            self._pull(plan, params, window, states[0], cancel_event)

        try:
            self.unpack(plan, target_dir, progress_callback, cancel_event, fill)
            state = states[0]
            relay.finished()
            drained = relay.drain(cancel_event, params.is_last, self.drain_idle, self.linger)
            if cancel_event.is_set():
                raise Cancelled()
        except BaseException:
            relay.close()
            raise
        if drained:
            relay.close()
        else:
            log.info("chain: still serving after the image is in; going on meanwhile")
            relay.close_when_drained(params.is_last, self.drain_idle)
        details = {
            "chunks": len(sizes),
            "from_relay": state.from_relay,
            "from_http": state.from_http,
            "bad": state.bad,
            "skips": state.skips,
            "switches": self.picker.switches,
            "lag_passes": state.lag_passes,
            "served_bytes": relay.served,
        }
        log.info("chain: received %s: %s", image.ref, details)
        return Received(state.done, details)

    # -- pulling ------------------------------------------------------------------

    def _accept(self, data: bytes, window: Window, state: _State) -> None:
        """The next chunk, checked: forward it, unpack it, count it."""
        window.complete(state.next, data)
        state.partial = bytearray()
        log.debug("chain: chunk %d whole", state.next)
        state.stream.add(data)

    def _fetch_http(
        self, plan: Plan, window: Window, state: _State, cancel: threading.Event
    ) -> None:
        index = state.next
        client = self.context.client
        if client is None:
            raise ReceiveError(f"chunk {index:08d}: no server to fetch it from over HTTP")
        window.restart()
        state.partial = bytearray()
        data = self.fetch_chunk(client, plan, index, state.stream.partial(), cancel)
        state.from_http += 1
        self._accept(data, window, state)

    def _pull(
        self,
        plan: Plan,
        params: ChainParams,
        window: Window,
        state: _State,
        cancel: threading.Event,
    ) -> None:
        picker = self.picker
        assert picker is not None
        count = len(plan.image.chunks)
        me = params.me[0]
        while state.next < count:
            if cancel.is_set():
                raise Cancelled()
            upstream = picker.current()
            if upstream is None:
                log.info("chain: chunk %d over HTTP (no upstream answers)", state.next)
                self._fetch_http(plan, window, state, cancel)
                picker.after_http()
                continue
            try:
                sock = self._connect(
                    upstream, params.session, (state.next, len(state.partial)), me, picker
                )
            except _Switch as exc:
                log.info("chain: %s: %s", upstream.name, exc)
                if picker.failed(fatal=exc.fatal):
                    log.warning("chain: passing %s (%s)", upstream.name, exc)
                elif cancel.wait(RETRY_DELAY):
                    raise Cancelled() from None
                continue
            log.info(
                "chain: pulling from %s at chunk %d (+%d)",
                upstream.name,
                state.next,
                len(state.partial),
            )
            try:
                self._stream(sock, plan, window, state, cancel, upstream.head)
            except _Switch as exc:
                if not exc.failure:
                    log.info("chain: leaving %s: %s", upstream.name, exc)
                    if exc.lagging:
                        state.lag_passes += 1
                        picker.pass_lagging()
                elif picker.failed(fatal=exc.fatal):
                    log.warning("chain: passing %s (%s)", upstream.name, exc)
                else:
                    log.info("chain: %s: %s", upstream.name, exc)
            finally:
                with contextlib.suppress(OSError):
                    sock.close()

    def _connect(
        self, upstream: Upstream, tag: str, at: tuple[int, int], me: str, picker: Picker
    ) -> socket.socket:
        """A connection to ``upstream`` that said yes to resuming ``at`` (chunk, offset)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tune(sock)
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(upstream.address)
        except OSError as exc:
            sock.close()
            raise _Switch(f"cannot connect: {exc}", failure=True) from None
        picker.answered()
        try:
            sock.settimeout(HELLO_TIMEOUT)
            sock.sendall(pack_hello(tag, at[0], me, at[1]))
            status, _have, message = read_answer(lambda n: read_exact(sock, n))
        except (OSError, ProtocolError, struct.error) as exc:
            sock.close()
            raise _Switch(f"no answer to the hello: {exc}", failure=True) from None
        if status != OK:
            sock.close()
            text = STATUS_TEXT.get(status, str(status))
            raise _Switch(f"refused: {text} {message}".rstrip(), failure=True, fatal=True)
        return sock

    def too_slow(self, lag: int, got: int, since: float) -> bool:
        """Whether an upstream that fell ``lag`` bytes behind its own is a slow node, for
        this node that got ``got`` bytes from it since ``since``."""
        elapsed = max(time.monotonic() - since, self.lag_seconds)
        return lag >= max(self.lag_bytes, got / elapsed * self.lag_seconds)

    def _read(self, sock: socket.socket, n: int, cancel: threading.Event) -> bytes:
        """``n`` bytes, looking at the cancel flag and the upstream's silence meanwhile."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        quiet_since = time.monotonic()
        sock.settimeout(0.2)
        while got < n:
            try:
                k = sock.recv_into(view[got:])
            except TimeoutError:
                if cancel.is_set():
                    raise Cancelled() from None
                if time.monotonic() - quiet_since > self.silence:
                    raise Silent(f"nothing for {self.silence:.0f} s") from None
                continue
            if not k:
                raise ConnectionError("the connection closed")
            got += k
            quiet_since = time.monotonic()
        return bytes(buf)

    def _stream(
        self,
        sock: socket.socket,
        plan: Plan,
        window: Window,
        state: _State,
        cancel: threading.Event,
        from_head: bool = False,
    ) -> None:
        """Read frames until the stream is whole; :class:`_Switch` to leave this upstream.

        Each frame says how far the upstream fell behind its own upstream (its ``lag``):
        past :meth:`too_slow`, this node pulls past it. This node's own lag, for the nodes
        after it, is measured here the same way; not behind the head, which holds
        everything from the start (a node pulling from it is as fast as its own link)."""
        picker = self.picker
        assert picker is not None
        chunks = plan.image.chunks
        count = len(chunks)
        buf = state.partial
        tries = max(1, self.context.tries)
        watch = LagWatch()
        window.lag = 0
        lagging = False
        since, before = time.monotonic(), state.done + len(buf)
        while state.next < count:
            if cancel.is_set():
                raise Cancelled()
            try:
                header = self._read(sock, FRAME.size, cancel)
                kind, index, offset, length, have, lag = FRAME.unpack(header)
                if kind == IDLE:
                    continue
                if not from_head:
                    window.lag = watch.growth(have, (state.done + len(buf)) >> 10)
                if kind == SKIP:
                    state.skips += 1
                    end = min(index, count)
                    log.info("chain: chunks %d to %d over HTTP", state.next, end - 1)
                    while state.next < end:
                        self._fetch_http(plan, window, state, cancel)
                    buf = state.partial
                    continue
                size = chunks[state.next].size
                if kind != DATA or index != state.next or offset != len(buf):
                    raise ProtocolError(
                        f"frame {kind} for chunk {index} at {offset}, "
                        f"expected chunk {state.next} at {len(buf)}"
                    )
                if not 0 < length <= size - offset:
                    raise ProtocolError(f"{length} bytes at {offset} of a {size}-byte chunk")
                lagging = self.too_slow(lag << 10, state.done + len(buf) - before, since)
                while length:
                    piece = self._read(sock, min(length, PIECE), cancel)
                    length -= len(piece)
                    buf += piece
                    window.extend(piece)
                    state.stream.progress(state.done + len(buf), state.stream.total)
            except (OSError, ProtocolError, struct.error) as exc:
                fatal = isinstance(exc, ProtocolError)
                raise _Switch(f"{type(exc).__name__}: {exc}", failure=True, fatal=fatal) from None
            if len(buf) < size:
                if lagging and picker.farther() is not None:
                    raise _Switch(  # mid-chunk: the part we have is kept, resumed at its byte
                        f"it fell {lag} KiB behind its upstream",
                        failure=False,
                        lagging=True,
                    )
                continue
            data = bytes(buf)
            buf = state.partial = bytearray()
            if not state.stream.matches(data):
                state.bad += 1
                window.restart()
                log.warning("chain: chunk %d from upstream does not match its sha256", state.next)
                if state.bad % tries:
                    raise _Switch("a chunk did not match: asking again", failure=False)
                # the same upstream sent it wrong `tries` times: HTTP for it, and pass it
                self._fetch_http(plan, window, state, cancel)
                raise _Switch("its chunks do not match", failure=True, fatal=True)
            state.from_relay += 1
            self._accept(data, window, state)
            buf = state.partial
            picker.succeeded()
            # a slow upstream
            if lagging and picker.farther() is not None:
                raise _Switch(
                    f"it fell {lag} KiB behind its upstream",
                    failure=False,
                    lagging=True,
                )
