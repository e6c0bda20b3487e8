"""What the upstream end of a chain connection does: answer a downstream's hello, then
send it frames from a source (a relay's window of the stream, or the head's chunk files).

Stdlib only: the nodes' relays and the server's head share it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

from corral.agent.wire.chain import (
    BAD_HELLO,
    BUSY,
    CLOSING,
    DATA,
    FRAME_MAX,
    HEARTBEAT,
    HELLO_TIMEOUT,
    IDLE,
    OK,
    PASSED,
    SILENCE,
    SKIP,
    WRONG_SESSION,
    Closed,
    Gone,
    Hello,
    ProtocolError,
    pack_answer,
    pack_frame,
    peer_closed,
    read_exact,
    read_hello,
)

log = logging.getLogger("corral.agent")


class Source(Protocol):
    @property
    def have(self) -> int: ...

    @property
    def held_kib(self) -> int: ...

    @property
    def lag(self) -> int: ...

    def read(self, index: int, offset: int, size: int, timeout: float) -> bytes | None:
        """Up to ``size`` bytes of chunk ``index`` from ``offset``; None if they are not
        here yet after ``timeout``; :class:`Gone` if they never will be; :class:`Closed`."""
        ...


class FileSource:
    """The head's source: the chunk files of the export, any of them at any time."""

    def __init__(self, path_of: Callable[[int], Path], sizes: list[int]) -> None:
        self.path_of = path_of
        self.count = len(sizes)
        self.size = sum(sizes)
        self._cached: tuple[int, bytes] | None = None

    @property
    def have(self) -> int:
        return self.count

    @property
    def held_kib(self) -> int:
        return self.size >> 10

    @property
    def lag(self) -> int:
        return 0  # the head sets no pace

    def read(self, index: int, offset: int, size: int, timeout: float) -> bytes | None:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self.path_of(index).read_bytes())
        return self._cached[1][offset : offset + size]


class Sender:
    """Serves one downstream connection from a source, from the chunk its hello named.

    Used by the relays and by the server's head alike. It ends when the downstream closes
    (after the last chunk: :attr:`complete`), on any socket error, or when the source closes.
    """

    def __init__(
        self,
        sock: socket.socket,
        source: Source,
        sizes: list[int],
        start: int,
        peer: str,
        *,
        offset: int = 0,
        heartbeat: float = HEARTBEAT,
        wait_close: float = 2 * SILENCE,
    ) -> None:
        self.sock = sock
        self.source = source
        self.sizes = sizes
        self.start = start
        self.offset = offset
        self.peer = peer
        self.heartbeat = heartbeat
        self.wait_close = wait_close
        #: the chunk being sent now: everything before it went out
        self.at = start
        self.sent = 0
        self.skips = 0
        self.complete = False
        self.last_activity = time.monotonic()
        self.last_progress = self.last_activity
        #: when this connection was served, for the logs and the tests
        self.started = self.last_activity
        self.ended: float | None = None
        self.done = threading.Event()
        self.error = ""

    def run(self) -> None:
        try:
            self._run()
        except (OSError, Closed) as exc:
            self.error = str(exc) or type(exc).__name__
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.last_activity = self.last_progress = self.ended = time.monotonic()
            self.done.set()

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.last_activity = time.monotonic()

    def _run(self) -> None:
        index, offset = self.start, self.offset
        count = len(self.sizes)
        if index < count and offset >= self.sizes[index]:
            return  # a resume past the end of its chunk: not a hello of this protocol
        source = self.source
        while index < count:
            # room first, then what to send: a frame does not wait, aging, in sendall
            _, room, _ = select.select([], [self.sock], [], self.heartbeat)
            if not room:
                if peer_closed(self.sock):
                    return
                continue
            try:
                data = source.read(index, offset, FRAME_MAX, self.heartbeat)
            except Gone as gone:
                log.info("chain: %s needs chunk %d, held from %d", self.peer, index, gone.low)
                self._send(pack_frame(SKIP, gone.low, have=source.held_kib, lag=source.lag))
                self.skips += 1
                index, offset = gone.low, 0
                self.at = index
                continue
            if data is None:
                if peer_closed(self.sock):
                    return
                self._send(pack_frame(IDLE, index, offset, b"", source.held_kib, source.lag))
                continue
            self._send(pack_frame(DATA, index, offset, data, source.held_kib, source.lag))
            self.last_progress = self.last_activity
            self.sent += len(data)
            offset += len(data)
            if offset >= self.sizes[index]:
                index, offset = index + 1, 0
                self.at = index
        # everything went out; the downstream closes once it has checked the last chunk
        deadline = time.monotonic() + self.wait_close
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], self.heartbeat)
            if ready:
                self.complete = not self.sock.recv(1)
                return


class Slot:
    """The one successor an upstream feeds: a node's relay, or the head in one session.

    A chain is a chain only while no uplink feeds two of its nodes (one that does halves
    the rate of everyone after both). Whoever says hello:

    - nobody is fed, the one fed has ended, or it is that same node again (it reconnects
      after a blip): it takes the slot;
    - it passed the node fed here (its hello names it: an upstream that went silent or
      fell behind, which it left for this one): it takes the slot, the passed node's
      connection is cut, and that node is refused from then on (:data:`PASSED`); it
      goes on from elsewhere, never as a second successor here;
    - anyone else: :data:`BUSY`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.name: str | None = None
        self.sender: Sender | None = None
        self.claimed = 0.0
        self.index = 0  # the chunk its hello asked for
        self.passed: set[str] = set()

    def _live(self) -> bool:
        if self.name is None:
            return False
        if self.sender is None:  # claimed, its answer on the way
            return self.clock() - self.claimed < HELLO_TIMEOUT
        return not self.sender.done.is_set()

    def claim(self, hello: Hello) -> tuple[int, str] | None:
        """A refusal (status, message), or None: ``hello.name`` holds the slot now."""
        displaced = None
        with self.lock:
            if hello.name in self.passed:
                return PASSED, f"{hello.name} was passed by its successor"
            if self._live() and hello.name != self.name:
                if not hello.passing or hello.passing != self.name:
                    return BUSY, f"feeds {self.name}"
                self.passed.add(hello.passing)
                displaced = self.sender
            elif self.name == hello.name:
                displaced = self.sender  # its old connection, if it still looks alive
            self.name, self.sender, self.claimed = hello.name, None, self.clock()
            self.index = hello.index
        if displaced is not None:
            with contextlib.suppress(OSError):
                displaced.sock.shutdown(socket.SHUT_RDWR)
        return None

    def attach(self, name: str, sender: Sender) -> None:
        """The connection that serves the node that claimed the slot."""
        with self.lock:
            if self.name == name:
                self.sender = sender

    def holder(self) -> str | None:
        with self.lock:
            return self.name if self._live() else None

    def needs(self, after: Collection[str], expected: bool) -> tuple[str, int] | None:
        """The node fed here and the chunk it needs now, if it comes after this one in the
        chain (its name in ``after``: not a node pulling from the tail); ``("", 0)`` if
        nobody came yet and one is ``expected``; else None."""
        with self.lock:
            if self.name is None:
                return ("", 0) if expected else None
            if self.name not in after or not self._live():
                return None
            return self.name, self.index if self.sender is None else self.sender.at


def answer_hello(
    sock: socket.socket,
    have_for: Callable[[str], int | None],
    closing: bool = False,
    admit: Callable[[Hello], tuple[int, str] | None] | None = None,
) -> Hello | None:
    """Read a downstream's hello and answer it; the hello if it is to be served.

    ``have_for(tag)`` is how many whole chunks this end holds for that session, or None
    if it is not one of this end's sessions; ``admit(hello)`` a refusal (status,
    message) or None (a :meth:`Slot.claim`)."""
    sock.settimeout(HELLO_TIMEOUT)
    try:
        hello = read_hello(lambda n: read_exact(sock, n))
    except (ProtocolError, struct.error, UnicodeError) as exc:
        with contextlib.suppress(OSError):
            sock.sendall(pack_answer(BAD_HELLO, 0, str(exc)))
        return None
    have = have_for(hello.tag)
    if have is None:
        log.warning("chain: %s asked for session %s, not one of ours", hello.name, hello.tag)
        sock.sendall(pack_answer(WRONG_SESSION, 0, "not a session of this end"))
        return None
    if closing:
        sock.sendall(pack_answer(CLOSING, have, "done serving"))
        return None
    refusal = admit(hello) if admit is not None else None
    if refusal is not None:
        sock.sendall(pack_answer(refusal[0], have, refusal[1]))
        return None
    sock.sendall(pack_answer(OK, have))
    sock.settimeout(None)
    return hello
