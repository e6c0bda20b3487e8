"""The ``multicast`` receiver in async mode: udp-sender never waits for this node, and
this node fetches over HTTP each chunk that a lost slice damaged.

In async mode udp-receiver runs with ``--ignore-lost-data``: a slice that FEC could not
rebuild is written in its place with its lost blocks left as zeros or stale bytes, so the
stream keeps its length and every chunk its offset (see
:mod:`corral.deploy.transports.multicast`). The agent cuts the output into the plan's
chunks as before; a chunk whose sha256 fails is *damaged*: it is set aside to be fetched
alone (:meth:`StreamReceiver.fetch_chunk`, checked and resumable) while the stream goes
on.

Two threads, so that udp-receiver is never kept waiting (a receiver whose pipe is full
stops reading its socket, and the kernel then drops the session's packets):

- the *reader* (the receiving thread) takes udp-receiver's output, checks each chunk and
  puts it into a :class:`Spool`, or marks it damaged;
- the *writer* unpacks the chunks in order (``zstd -d | tar -x`` needs them in order).
  At a damaged chunk it waits for the session's end before fetching it, and keeps the
  good chunks that follow in the spool meanwhile: this node's link is full with the
  session (``max_bitrate`` is set just under the slowest node link), so a fetch during
  the session would only take its share from the session's packets and damage more
  chunks. It fetches at once when the spool holds more than half its limit; past the
  limit the reader sets new chunks aside as damaged rather than hold more in memory.

No rate watch here: in async mode a slow node holds nobody back, it only loses slices.
What it judges instead is whether the session is any use to it: after
:data:`DAMAGED_IN_A_ROW` damaged chunks in a row it leaves, and takes the rest by HTTP.
Each damaged chunk costs one HTTP copy whether the node stays or not, so a node that
loses nearly every slice (a link far slower than the session, or a receiver starved of
CPU) gains nothing by staying, and leaving frees its link (on a switch that snoops IGMP)
for the HTTP copies. A few damaged chunks apart, as loss beyond the FEC gives, do not make
it leave.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from corral.agent.errors import Cancelled
from corral.agent.receivers.stream import VerifiedStream, chunk_mismatch

log = logging.getLogger("corral.agent")

#: Damaged chunks in a row after which the node leaves the session for HTTP.
DAMAGED_IN_A_ROW = 3
#: The spool's limit, at the least and at the most: a quarter of the memory available.
SPOOL_FLOOR = 64 << 20
SPOOL_CEILING = 2 << 30

#: ``fetch(index)``: chunk ``index`` over HTTP, checked.
Fetch = Callable[[int], bytes]


def spool_limit(meminfo: str = "/proc/meminfo") -> int:
    """Bytes the spool may hold: a quarter of MemAvailable, within its floor and ceiling."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    return max(SPOOL_FLOOR, min(SPOOL_CEILING, available // 4))
    except (OSError, ValueError, IndexError):
        pass
    return SPOOL_FLOOR


class Spool:
    """The checked chunks that came ahead of the one being unpacked, and the damaged
    ones, between the reader and the writer (any thread)."""

    def __init__(self, limit: int, cancel: threading.Event) -> None:
        self.limit = limit
        self.cancel = cancel
        self.chunks: dict[int, bytes] = {}
        self.held = 0  # bytes in ``chunks``
        self.damaged: set[int] = set()
        self.reached = 0  # the chunks before this one came (good or damaged) or never will
        self.ended = False  # the session brings nothing more
        self.aborted = False  # the receiving failed: the writer is to stop
        self._cond = threading.Condition()

    def put(self, index: int, data: bytes) -> bool:
        """Keep checked chunk ``index``; False (and it counts as damaged) if the spool is
        full."""
        with self._cond:
            kept = self.held + len(data) <= self.limit
            if kept:
                self.chunks[index] = data
                self.held += len(data)
            else:
                self.damaged.add(index)
            self.reached = index + 1
            self._cond.notify_all()
            return kept

    def damage(self, index: int) -> None:
        with self._cond:
            self.damaged.add(index)
            self.reached = index + 1
            self._cond.notify_all()

    def end(self) -> None:
        """The session is over for this node: whatever did not come is to be fetched."""
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()

    def take(self, index: int) -> bytes | None:
        """Chunk ``index`` once it came; None when it is to be fetched by HTTP now (it
        never came, or came damaged and the session ended or the spool is half full).
        Raise :class:`Cancelled` once the cancel flag is set."""
        with self._cond:
            while True:
                if self.cancel.is_set() or self.aborted:
                    raise Cancelled()
                data = self.chunks.pop(index, None)
                if data is not None:
                    self.held -= len(data)
                    return data
                if self.ended or (index in self.damaged and self.held * 2 > self.limit):
                    return None
                self._cond.wait(0.2)


class AsyncReceiving:
    """One async session's receiving: the reader's loop (:meth:`read`, in the calling
    thread) and the writer thread (:meth:`start`, :meth:`finish`)."""

    connect_timeout = 10.0
    start_margin = 20.0
    stall_timeout = 20.0

    def __init__(
        self,
        stream: VerifiedStream,
        fetch: Fetch,
        cancel: threading.Event,
        limit: int | None = None,
        poll: float = 0.2,
    ) -> None:
        self.stream = stream
        self.fetch = fetch
        self.cancel = cancel
        self.poll = poll
        self.spool = Spool(spool_limit() if limit is None else limit, cancel)
        self.by_multicast = 0
        self.repaired: list[int] = []  # damaged chunks fetched again by HTTP
        self.left = ""  # why the session ended early for this node ("" if it did not)
        self.stderr_tail = ""
        self.connected = False
        self.error: BaseException | None = None
        self.writer: threading.Thread | None = None

    # --- the writer ----------------------------------------------------------------------

    def start(self) -> None:
        self.writer = threading.Thread(target=self._write, name="corral-mcast-writer", daemon=True)
        self.writer.start()

    def _write(self) -> None:
        stream = self.stream
        try:
            while not stream.complete:
                index = stream.index
                data = self.spool.take(index)
                if data is None:
                    if index in self.spool.damaged:
                        self.repaired.append(index)
                    data = self.fetch(index)
                else:
                    self.by_multicast += 1
                stream.add(data)
        except BaseException as exc:  # raised again in the receiving thread
            self.error = exc

    def finish(self) -> None:
        """Wait for the writer (the session is over: it fetches what is missing); raise
        what it raised."""
        self.spool.end()
        while self.writer is not None and self.writer.is_alive():
            self.writer.join(self.poll)
            if self.cancel.is_set() and self.writer.is_alive():
                self.writer.join(5.0)  # it sees the flag within its next wait or read
                raise Cancelled()
        if self.error is not None:
            raise self.error

    # --- the reader ----------------------------------------------------------------------

    def read(
        self,
        proc: subprocess.Popen[bytes],
        out: IO[bytes],
        err: IO[bytes],
        start_wait: float,
        describe_end: Callable[[subprocess.Popen[bytes], str], str],
    ) -> None:
        """Cut udp-receiver's output into chunks until the session ends for this node
        (``self.left`` says why, if early). ``start_wait``: seconds from udp-receiver's
        start to the sender's first hello (corral launches the sender only when its nodes
        are all there)."""
        chunks = self.stream.plan.image.chunks
        count = len(chunks)
        buf = bytearray()
        errors = ReceiverStderr()
        started = time.monotonic()
        connected: float | None = None
        last = started
        index = 0  # the next chunk the session brings
        in_a_row = 0
        readers: list[IO[bytes]] = [out, err]
        while index < count:
            if self.cancel.is_set():
                raise Cancelled()
            if self.error is not None:
                self.left = "the unpacking failed"
                return
            ready, _, _ = select.select(readers, [], [], self.poll)
            now = time.monotonic()
            for pipe in ready:
                data = os.read(pipe.fileno(), 1 << 16)
                if pipe is err:
                    if not data:
                        readers.remove(err)
                        continue
                    if errors.add(data):
                        connected = last = now
                        self.connected = True
                    self.stderr_tail = errors.tail
                    continue
                if not data:
                    self.stderr_tail = errors.tail
                    self.left = describe_end(proc, self.stderr_tail)
                    return
                last = now
                buf += data
                while index < count and len(buf) >= chunks[index].size:
                    piece = bytes(buf[: chunks[index].size])
                    del buf[: len(piece)]
                    if not chunk_mismatch(self.stream.plan, index, piece):
                        in_a_row = 0
                        self.spool.put(index, piece)
                    else:
                        in_a_row += 1
                        self.spool.damage(index)
                        log.info("multicast: chunk %08d came damaged: to fetch by HTTP", index)
                    index += 1
                    if in_a_row >= DAMAGED_IN_A_ROW:
                        self.left = (
                            f"{in_a_row} chunks in a row came damaged: leaving the session for HTTP"
                        )
                        return
            if connected is None and now - started > start_wait + self.connect_timeout:
                self.left = f"no udpcast sender started within {now - started:.0f} s"
                return
            if connected is not None and now - last > (
                self.stall_timeout if buf or index else self.start_margin + self.stall_timeout
            ):
                self.left = f"no data from the session for {now - last:.0f} s"
                return


class ReceiverStderr:
    """What udp-receiver writes on stderr, as it comes: whether it has joined a session
    (its "Connected as" line), and its last lines for the log and the node's error."""

    #: Bytes kept: its progress lines come many times a second for the whole session.
    KEEP = 4096

    def __init__(self) -> None:
        self._text = bytearray()
        self.joined = False

    def add(self, data: bytes) -> bool:
        """Take ``data``; True the first time it says it joined a session."""
        self._text += data
        joined_now = not self.joined and b"Connected as" in self._text
        self.joined = self.joined or joined_now
        del self._text[: -self.KEEP]
        return joined_now

    @property
    def tail(self) -> str:
        """The last few lines, on one line."""
        text = self._text.decode("utf-8", "replace").replace("\r", "\n")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " / ".join(lines[-3:])
