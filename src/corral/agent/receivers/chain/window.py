"""A relay's memory of the stream (:class:`Window`): what the node's relay serves the
nodes after it from."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from corral.agent.receivers.chain.upstream import LAG_WINDOW
from corral.agent.wire.chain import Closed, Gone

log = logging.getLogger("corral.agent")

#: Whole chunks a relay keeps for nodes that (re)connect behind it: 8 x 4 MiB = 32 MiB of
#: the node's RAM, 13 s of data at 20 Mbit/s, enough for a bypassing node to resume.
WINDOW_CHUNKS = 8
#: The most a relay holds the stream for the node after it, in seconds within any
#: LAG_WINDOW (refilled evenly). 32 MiB is 128 s at 2 Mbit/s but 27 ms at 10 Gbit/s: on
#: fast links a successor that starts half a second late, or runs a little slower, would
#: fall out of the window and take the gap from the server. Held, it stays on the chain,
#: and the hold reaches up the chain (a relay that does not read fills its upstream's
#: window). Half of LAG_SECONDS: a relay's own lag grows by at most what it held, so a
#: relay that waits for a slow successor never looks slow itself to that successor.
HOLD_SECONDS = 4.0


class Window:
    """A relay's memory of the stream: the last ``keep`` whole, checked chunks, and the
    pieces of the chunk arriving now (forwarded before it is checked; each node checks for
    itself). Chunks arrive in order; everything below :attr:`have` was checked."""

    def __init__(
        self,
        sizes: list[int],
        keep: int = WINDOW_CHUNKS,
        *,
        hold: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        #: who the node after this one is ("" before it came) and the chunk it still
        #: needs, or None: nobody to hold the stream for (set by the relay)
        self.successor: Callable[[], tuple[str, int] | None] = lambda: None
        self.hold = hold
        self.clock = clock
        self.budget = hold  # seconds of holding left
        self.refilled = clock()
        self.held = 0.0  # seconds held in all
        self.given_up: str | None = None  # the successor held for in vain
        self._read_at = -1

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
            self.cond.notify_all()
            self._hold_for_successor(self._have - self.keep)
            for old in [k for k in self.chunks if k < self._have - self.keep]:
                del self.chunks[old]
            self.cond.notify_all()

    def _hold_for_successor(self, low: int) -> None:
        """Wait (the lock held, released while waiting) while the node after this one still
        needs a chunk below ``low``, which would be forgotten: at most the budget left. A
        successor held for in vain is not held for again until it is back in the window
        (it took the gap from the server), so that one that is gone, or slow, costs the
        chain one budget, not a slower pace."""
        if self.hold <= 0:
            return
        now = self.clock()
        rate = self.hold / LAG_WINDOW
        self.budget = min(self.hold, self.budget + (now - self.refilled) * rate)
        self.refilled = now
        started = now
        waited = False
        while not self.closed:
            wanted = self.successor()
            if wanted is None or wanted[1] >= low:
                if wanted is not None and wanted[0] == self.given_up:
                    self.given_up = None  # back in the window
                break
            who, needs = wanted
            if who == self.given_up:
                break
            if self.clock() - started >= self.budget:
                self.given_up = who
                log.info(
                    "chain: %s needs chunk %d, which this relay forgets now: held the "
                    "stream for it %.1f s, going on without it (it takes the gap from "
                    "the server)",
                    who or "the node after this one, not here yet,",
                    needs,
                    self.clock() - started,
                )
                break
            self.cond.wait(min(0.05, self.budget - (self.clock() - started)))
            waited = True
        if waited:
            spent = self.clock() - started
            self.budget = max(0.0, self.budget - spent)
            self.held += spent
            self.refilled = self.clock()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def read(self, index: int, offset: int, size: int, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            if index != self._read_at:  # a sender moved on: a hold may be over
                self._read_at = index
                self.cond.notify_all()
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
