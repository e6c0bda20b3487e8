"""The ``multicast`` receiver: udpcast for the bulk of the stream, HTTP for what it misses.

``udp-receiver`` joins the session the plan names (``transport.params["session"]``: its
rendezvous group and ports) and writes the stream to its stdout; the agent cuts it into
the plan's chunks and checks each one's sha256 before a byte of it reaches
``zstd -d | tar -x``, exactly as the http receiver does, so nothing unverified is ever
unpacked.

The session never waits for this node for long, and this node never waits for the
session for long either. Whenever the multicast part ends early, the node goes on by HTTP
from the first chunk it lacks (:meth:`StreamReceiver.fetch_chunk`, the same checked,
resumable fetch), so it catches up after the others:

- nobody answers within :data:`CONNECT_TIMEOUT` (the node is late: the sender started
  or finished without it), or the sender never starts sending;
- the sender dropped this node (it was not answering: udp-receiver exits non-zero), or
  no byte came for :data:`STALL_TIMEOUT` (longer while the session's packets still
  arrive: the sender is resending for a slower node, which may take ``leave_window`` to
  leave);
- a chunk did not match the plan (a corrupted datagram that UDP's checksum let through,
  or another session's data);
- this node's link is too slow for the session: its interface received less than
  ``leave_below`` of the session's rate over ``leave_window`` seconds, while its own
  unpacking was not what held it back. In acknowledged mode udpcast goes at the pace of
  its slowest receiver, and the others keep receiving near the full rate (the
  retransmissions for the slow one reach them too), so the slow node is the one that
  sees little and it leaves; the sender then drops it like a dead one.

That is acknowledged mode. In async mode (the plan's session says ``"mode": "async"``)
the sender waits for nobody, and :mod:`corral.agent.receivers.multicast_async` takes
udp-receiver's output instead: a damaged chunk is fetched alone by HTTP and the session
goes on; the same ways out apply, but for the rate watch.

The plan's chunk hashes are what keeps a rejoining or confused node from taking the wrong
data: the session's tag (deployment / image ref / stream sha256) is checked against the
plan before joining, but even a node that reached the wrong sender would unpack nothing,
since the first chunk would not match and it would go on by HTTP.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.network import interface_ipv4, raise_rmem_max, source_address
from corral.agent.plan import Plan
from corral.agent.receivers.base import Context, Job, Received, StreamReceiver
from corral.agent.receivers.multicast_async import AsyncReceiving, ReceiverStderr
from corral.agent.receivers.stream import ProgressCallback, VerifiedStream
from corral.agent.run import spawn, stop

log = logging.getLogger("corral.agent")

#: Seconds from udp-receiver's start to "Connected": a sender that still waits for its
#: nodes answers within a second; none answering means the session left without us.
CONNECT_TIMEOUT = 10.0
#: Seconds beyond the session's ``max_wait`` for the first byte once connected.
START_MARGIN = 20.0
#: Seconds without a byte, once bytes flowed, before the session is given up: udp-sender
#: pauses about 3 s to drop a dead receiver, so 20 s means it is gone or dropped us.
#: Unless its packets still arrive (:data:`ALIVE_SHARE`): see :meth:`MulticastReceiver.stalled`.
STALL_TIMEOUT = 20.0
#: A share of the session's rate that, arriving on the node's interface, shows the session
#: alive while no byte comes out: the sender resending for a slower receiver.
ALIVE_SHARE = 0.1
#: udp-receiver's own --receive-timeout, a backstop should the agent's watch fail.
RECEIVE_TIMEOUT = 60
#: Seconds to let udp-receiver end by itself after the last chunk (its final ACK lets
#: the sender finish at once instead of dropping this node after a few seconds).
EXIT_GRACE = 3.0
#: Bytes of socket buffer udp-receiver asks for, at least: the kernel's default (208 KiB,
#: under a second at 2 Mbit/s) overflowed when 100 receivers shared two cores, and the
#: sender resent 2-3 % of the stream for it. A second of the session's rate if that is
#: more, up to :data:`RCVBUF_MAX` (the kernel may hold twice that for the socket).
RCVBUF = 4 * 2**20
RCVBUF_MAX = 64 * 2**20
#: Unpacking that blocks the agent for more than this fraction of the window means the
#: node itself, not its link, is slow: it stays (leaving would not make it faster).
BUSY_FRACTION = 0.5


@dataclass(frozen=True)
class Session:
    """The udpcast session a plan names (:mod:`corral.deploy.transports.multicast` makes it)."""

    tag: str
    rdv: str
    portbase: int
    interface: str  # the node's address, as the server knows it: a hint
    max_bitrate: int
    max_wait: float
    leave_below: float
    leave_window: float
    mode: str = "acked"

    @classmethod
    def from_plan(cls, plan: Plan) -> Session | None:
        """The plan's session, or None (logged) when it has none or names another image."""
        raw = plan.transport.params.get("session")
        if not raw:
            return None
        try:
            session = cls(
                tag=str(raw["tag"]),
                rdv=str(raw["rdv"]),
                portbase=int(raw["portbase"]),
                interface=str(raw.get("interface") or ""),
                max_bitrate=int(raw["max_bitrate"]),
                max_wait=float(raw["max_wait"]),
                leave_below=float(raw.get("leave_below", 0.0)),
                leave_window=float(raw.get("leave_window", 10.0)),
                mode=str(raw.get("mode", "acked")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("multicast: the plan's session is malformed (%s): using HTTP", exc)
            return None
        if session.mode not in ("acked", "async"):
            log.warning("multicast: the session's mode %r is unknown: using HTTP", session.mode)
            return None
        expected = f"{plan.deployment}/{plan.image.ref}/{plan.image.stream_sha256}"
        if session.tag != expected:
            log.warning(
                "multicast: the session is tagged %s, this plan is %s: using HTTP",
                session.tag,
                expected,
            )
            return None
        return session


def receive_buffer(session: Session) -> int:
    """The socket buffer udp-receiver asks for (:data:`RCVBUF`)."""
    return min(max(RCVBUF, session.max_bitrate // 8), RCVBUF_MAX)


def receiver_argv(session: Session, address: str) -> list[str]:
    """udp-receiver for ``session`` on the interface that holds ``address``; the stream
    comes out on stdout."""
    start_timeout = int(CONNECT_TIMEOUT + session.max_wait + START_MARGIN)
    return [
        "udp-receiver",
        "--nokbd",
        "--no-progress",
        "--interface",
        address,
        "--portbase",
        str(session.portbase),
        "--mcast-rdv-address",
        session.rdv,
        "--start-timeout",
        str(start_timeout),
        "--receive-timeout",
        str(RECEIVE_TIMEOUT),
        "--rcvbuf",
        str(receive_buffer(session)),
        # async: a slice FEC cannot rebuild is written in place, damaged, instead of
        # ending udp-receiver; the chunk's sha256 finds it
        *(["--ignore-lost-data"] if session.mode == "async" else []),
    ]


class RateWatch:
    """The interface's receive rate, one sample a second, over the last ``window`` s.

    What counts is the best second of the window, not its average: when udp-sender pauses
    to drop a dead receiver (2-3 s), every node receives nothing for a while and then the
    full rate again, whereas a link too slow for the session never gets near it.
    """

    def __init__(self, read: Callable[[], int | None], window: float, period: float = 1.0) -> None:
        self.read = read
        self.window = window
        self.period = period
        self.samples: collections.deque[tuple[float, int, float]] = collections.deque()

    def sample(self, now: float, busy: float) -> tuple[float, float] | None:
        """(the best rate of one period in bits/s, the fraction of the time spent
        unpacking) over the last full window, or None until a window has passed."""
        if self.samples and now - self.samples[-1][0] < self.period:
            return None
        count = self.read()
        if count is None:
            return None
        self.samples.append((now, count, busy))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first = self.samples[0]
        span = now - first[0]
        if span < self.window:
            return None
        pairs = zip(self.samples, list(self.samples)[1:], strict=False)
        best = max(_bps(a, b) for a, b in pairs)
        return best, (busy - first[2]) / span

    def latest(self) -> tuple[float, float] | None:
        """(when the last sample was taken, the rate in bits/s since the one before), or
        None before two samples."""
        if len(self.samples) < 2:
            return None
        return self.samples[-1][0], _bps(self.samples[-2], self.samples[-1])


def _bps(a: tuple[float, int, float], b: tuple[float, int, float]) -> float:
    """The rate in bits/s between two of :class:`RateWatch`'s samples (time, count, busy)."""
    return (b[1] - a[1]) * 8 / max(b[0] - a[0], 1e-3)


class MulticastReceiver(StreamReceiver):
    """udp-receiver into checked chunks; HTTP from the first chunk it did not deliver."""

    name = "multicast"

    connect_timeout = CONNECT_TIMEOUT
    start_margin = START_MARGIN
    stall_timeout = STALL_TIMEOUT
    exit_grace = EXIT_GRACE
    #: seconds between two looks at the interface's counter
    rate_period = 1.0
    #: async mode: bytes of chunks kept ahead of the unpacking (None: from MemAvailable)
    spool_limit: int | None = None

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        #: why the multicast part ended before the whole stream ("" if it did not)
        self.left = ""
        self.stderr_tail = ""
        #: chunks that came by multicast
        self.by_multicast = 0
        #: async mode: chunks that came damaged and were fetched again by HTTP
        self.repaired: list[int] = []

    # --- what tests replace ------------------------------------------------------------

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def local_address(self, session: Session) -> str:
        """This node's address toward corral (where the session's sender is), else the
        server's idea of it."""
        client = self.context.client
        if client is not None:
            found = source_address(client.host, client.port)
            if found:
                return found
        return session.interface

    def interface_name(self, address: str) -> str | None:
        for _, name in socket.if_nameindex():
            if interface_ipv4(name) == address:
                return name
        return None

    def make_room(self, wanted: int) -> None:
        """Let udp-receiver's socket have ``wanted`` bytes (the kernel caps what a socket
        asks for at ``net.core.rmem_max``)."""
        limit = raise_rmem_max(wanted)
        if limit < wanted:
            log.info(
                "multicast: the kernel caps socket buffers at %d KiB (net.core.rmem_max), "
                "under the %d KiB udp-receiver asks for",
                limit // 1024,
                wanted // 1024,
            )

    def rx_bytes(self, interface: str) -> int | None:
        try:
            return int(Path(f"/sys/class/net/{interface}/statistics/rx_bytes").read_text())
        except (OSError, ValueError):
            return None

    # --- receiving ---------------------------------------------------------------------

    def receive(self, job: Job) -> Received:
        if self.context.client is None:
            raise ReceiveError("transport multicast needs corral.server= to catch up from")
        image = job.plan.image
        self.by_multicast = 0
        self.repaired = []

        def fill(stream: VerifiedStream) -> None:
            session = Session.from_plan(job.plan)
            if session is None:
                self.left = "the plan names no multicast session to join"
            else:
                self.join(job.plan, session, stream, job.progress, job.cancel)
            if not stream.complete:
                log.info(
                    "multicast: %s; by HTTP from chunk %d of %d",
                    self.left,
                    stream.index,
                    len(image.chunks),
                )

        stream = self.unpack(job, fill)
        chunks = len(image.chunks)
        log.info(
            "received %s: %d bytes in %d chunks, %d by multicast, %d by HTTP "
            "(%d repaired, %d fetched again, %d resumed)",
            image.ref,
            stream.done,
            chunks,
            self.by_multicast,
            chunks - self.by_multicast,
            len(self.repaired),
            len(self.refetched),
            len(self.resumed),
        )
        return Received(
            stream.done,
            {
                "chunks": chunks,
                "multicast": self.by_multicast,
                "unicast": chunks - self.by_multicast,
                "repaired": len(self.repaired),
                "refetched": len(self.refetched),
                "resumed": len(self.resumed),
            },
        )

    def join(
        self,
        plan: Plan,
        session: Session,
        stream: VerifiedStream,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> None:
        """Take checked chunks from udp-receiver until the stream is whole or the session
        is of no more use (``self.left`` says why)."""
        address = self.local_address(session)
        if not address:
            self.left = "no local address to receive the session on"
            return
        argv = receiver_argv(session, address)
        self.make_room(receive_buffer(session))
        log.info("+ %s", shlex.join(argv))
        try:
            proc = self.spawn(argv)
        except OSError as exc:
            self.left = f"udp-receiver did not start: {exc}"
            return
        if session.mode == "async":
            self.join_async(proc, session, stream, cancel)
            return
        interface = self.interface_name(address)
        watch = None
        if interface is not None:
            rx = functools.partial(self.rx_bytes, interface)
            watch = RateWatch(rx, session.leave_window, self.rate_period)
        out, err = proc.stdout, proc.stderr
        assert out is not None and err is not None
        try:
            self._pump(proc, out, err, session, stream, progress, cancel, watch)
        finally:
            if stream.complete:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(self.exit_grace)
            _leave(proc)
            for pipe in (out, err):
                pipe.close()
        if stream.complete:
            self.left = ""
        elif not self.left:
            self.left = f"udp-receiver exited with {proc.returncode}"
        if self.stderr_tail and self.left:
            log.info("udp-receiver: %s", self.stderr_tail)

    def join_async(
        self,
        proc: subprocess.Popen[bytes],
        session: Session,
        stream: VerifiedStream,
        cancel: threading.Event,
    ) -> None:
        """Async mode: read the session while a writer thread unpacks and repairs; on
        return the stream is whole (the writer fetched what the session did not bring)."""
        client = self.context.client
        assert client is not None  # receive() checked
        plan = stream.plan

        def fetch(index: int) -> bytes:
            return self.fetch_chunk(client, plan, index, lambda n: None, cancel)

        receiving = AsyncReceiving(stream, fetch, cancel, self.spool_limit, self.context.poll)
        for name in ("connect_timeout", "start_margin", "stall_timeout"):
            setattr(receiving, name, getattr(self, name))
        out, err = proc.stdout, proc.stderr
        assert out is not None and err is not None
        receiving.start()
        try:
            try:
                # the sender starts once all its nodes asked for their plans: max_wait
                # after the first at the latest
                receiving.read(proc, out, err, session.max_wait, _ended)
            finally:
                if receiving.spool.reached >= len(plan.image.chunks):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(self.exit_grace)
                _leave(proc)
                for pipe in (out, err):
                    pipe.close()
                self.stderr_tail = receiving.stderr_tail
                self.left = receiving.left
                if self.left:
                    log.info(
                        "multicast: %s; by HTTP from chunk %d of %d (udp-receiver: %s)",
                        self.left,
                        receiving.spool.reached,
                        len(plan.image.chunks),
                        self.stderr_tail,
                    )
            receiving.finish()
        except BaseException:
            receiving.spool.abort()  # the writer stops at its next wait: fetch nothing more
            raise
        finally:
            self.by_multicast = receiving.by_multicast
            self.repaired = receiving.repaired

    def _pump(
        self,
        proc: subprocess.Popen[bytes],
        out: IO[bytes],
        err: IO[bytes],
        session: Session,
        stream: VerifiedStream,
        progress: ProgressCallback,
        cancel: threading.Event,
        watch: RateWatch | None,
    ) -> None:
        chunks = stream.plan.image.chunks
        total = stream.total
        buf = bytearray()
        errors = ReceiverStderr()
        started = time.monotonic()
        connected: float | None = None
        first: float | None = None
        last = started
        #: when the session last showed life: a byte out, or its packets arriving
        alive = started
        readers: list[IO[bytes]] = [out, err]
        while not stream.complete:
            if cancel.is_set():
                raise Cancelled()
            ready, _, _ = select.select(readers, [], [], self.context.poll)
            now = time.monotonic()
            for pipe in ready:
                data = os.read(pipe.fileno(), 1 << 16)
                if pipe is err:
                    if not data:
                        readers.remove(err)
                        continue
                    if errors.add(data):
                        connected = now
                        log.info("multicast: joined session %s (%s)", session.tag, errors.tail)
                        if self.context.joined is not None:
                            # the sender starts once its nodes said so (not on its count)
                            self.context.joined(session.tag)
                    self.stderr_tail = errors.tail
                    continue
                if not data:
                    if err in readers:
                        errors.add(_drain(err))
                    self.stderr_tail = errors.tail
                    self.left = _ended(proc, self.stderr_tail)
                    return
                first = first or now
                last = alive = now
                buf += data
                while not stream.complete and len(buf) >= chunks[stream.index].size:
                    piece = bytes(buf[: chunks[stream.index].size])
                    if not stream.matches(piece):
                        self.left = (
                            f"chunk {stream.index:08d} from the session did not match its sha256"
                        )
                        return
                    del buf[: len(piece)]
                    stream.add(piece)
                    self.by_multicast += 1
                progress(stream.done + len(buf), total)
            if stream.complete:
                log.info(
                    "multicast: the whole stream in %.1f s from udp-receiver's start, "
                    "%.1f s from the first byte (%.1f Mbit/s)",
                    now - started,
                    now - (first or started),
                    total * 8 / max(now - (first or started), 1e-3) / 1e6,
                )
                return
            if connected is None and now - started > self.connect_timeout:
                self.left = f"no udpcast sender answered within {self.connect_timeout:.0f} s"
                return
            waited = now - connected if connected is not None and first is None else 0.0
            if waited > session.max_wait + self.start_margin:
                self.left = "the session did not start sending"
                return
            if first is None:
                continue
            # the interface's counter, once a period: for the stall limit and the rate
            rate = watch.sample(now, stream.busy) if watch is not None else None
            arriving = watch.latest() if watch is not None else None
            if arriving is not None and arriving[1] >= ALIVE_SHARE * session.max_bitrate:
                alive = max(alive, arriving[0])
            why = self.stalled(now - last, now - alive, session)
            if why:
                self.left = why
                return
            if rate is not None and session.leave_below > 0:
                bps, busy = rate
                if bps < session.leave_below * session.max_bitrate and busy < BUSY_FRACTION:
                    self.left = (
                        f"this node's link carried {bps / 1e6:.1f} Mbit/s of the session's "
                        f"{session.max_bitrate / 1e6:.1f}: leaving it so as not to slow "
                        "the others"
                    )
                    return

    def stalled(self, quiet: float, lifeless: float, session: Session) -> str:
        """Why the session is given up after ``quiet`` seconds without a byte out of it,
        its packets last arriving ``lifeless`` seconds ago; "" while it is not.

        In acknowledged mode the sender waits for its slowest receiver. A receiver too
        slow for the session is judged on ``leave_window`` before it leaves, and the
        others may get no new byte for that long, while the sender resends to it (the
        resent packets reach them too). Measured at N = 100 with a node at B/10 and a
        20 s limit, the other 99 gave up on such a session a few seconds before the slow
        node left it, all at once, and took the whole image over HTTP. So a session whose
        packets still arrive gets ``2 x leave_window`` more."""
        if quiet <= self.stall_timeout:
            return ""
        if lifeless > self.stall_timeout:
            return f"no data from the session for {self.stall_timeout:.0f} s"
        if quiet > self.stall_timeout + 2 * session.leave_window:
            return f"the session sent nothing new for {quiet:.0f} s, only resent for others"
        return ""


def _leave(proc: subprocess.Popen[bytes]) -> None:
    """Stop udp-receiver with SIGINT first: it then tells the sender it leaves, and the
    sender goes on at once instead of waiting some seconds to drop it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2.0)
    stop(proc, grace=2.0)


def _drain(pipe: IO[bytes], timeout: float = 2.0) -> bytes:
    """What is left in ``pipe`` until its end (udp-receiver says why it stopped as it
    exits), waiting at most ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([pipe], [], [], left)
        if not ready:
            break
        piece = os.read(pipe.fileno(), 1 << 16)
        if not piece:
            break
        data += piece
    return data


def _ended(proc: subprocess.Popen[bytes], said: str) -> str:
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        return "udp-receiver closed its output"
    if "Dropped by server" in said:
        return "the sender dropped this node"
    return f"udp-receiver ended (exit {code}) before the stream was whole"
