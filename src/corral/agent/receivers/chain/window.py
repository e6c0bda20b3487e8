"""A relay's memory of the stream (:class:`Window`): what the node's relay serves the
nodes after it from."""

from __future__ import annotations

import threading
import time

from corral.agent.wire.chain import Closed, Gone

#: Whole chunks a relay keeps for nodes that (re)connect behind it: 8 x 4 MiB = 32 MiB of
#: the node's RAM, 13 s of data at 20 Mbit/s, enough for a bypassing node to resume.
WINDOW_CHUNKS = 8


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
