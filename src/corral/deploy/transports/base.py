"""The server's side of a transport: one small interface (:class:`ServerTransport`), what
the unicast ones share (:class:`Unicast`), and a session's :class:`Member`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from corral.config import Settings
from corral.errors import CorralError
from corral.images.exports import Chunked


class NotReady(CorralError):
    """:meth:`ServerTransport.params` has no plan for this node yet (a chain still
    gathering its nodes): the node is alive and asks again; its plan is not an error."""


@dataclass(frozen=True)
class Member:
    """A node in a transfer session: its name, the address it receives on, and its rack
    (the ``rack`` variable; None for a node in none), which rack-aware transports follow."""

    node: str
    ip: str | None
    rack: str | None = None


class ServerTransport(Protocol):
    """The server's side of a transport.

    The manager calls :meth:`prepare` for each export a deployment needs (an image
    version's stream for installs, its squashfs for diskless boots: a :class:`Chunked`), then
    :meth:`start` once per session (the nodes of one deployment that get the same image by
    this transport) before it reboots them, and :meth:`finish` when every node of the
    session has ended; after a restart of corral serve, :meth:`start` is called again with
    the nodes still going. :meth:`params` goes into each node's plan (or raises
    :class:`NotReady`: the node asks again). :meth:`sent` is read
    at each scrape of ``/metrics``.
    """

    name: str
    #: the export the transport sends: "stream" (chunked tar) or "tree"
    export: str

    def prepare(self, payload: Chunked) -> None: ...

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None: ...

    def params(self, payload: Chunked, node: str) -> dict[str, Any]: ...

    def finish(self, deployment: int, payload: Chunked) -> None: ...

    def sent(self) -> dict[str, int]:
        """Bytes this transport sent of each export (by its ref) since the server started,
        by its own means: not the HTTP chunk routes, which count theirs. Cheap: no I/O."""
        ...

    def close(self) -> None: ...


class Unicast:
    """Sessions mean nothing to a transport that serves each node on its own."""

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None:
        pass

    def finish(self, deployment: int, payload: Chunked) -> None:
        pass

    def sent(self) -> dict[str, int]:
        return {}  # its bytes leave by the HTTP chunk routes, or by a daemon that keeps its own


class Meter:
    """Bytes sent per export (its ref), from any thread, only ever growing: what a
    transport's sessions sent, kept when they end, for ``/metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, int] = {}

    def add(self, ref: str, count: int) -> None:
        if count > 0:
            with self._lock:
                self._sent[ref] = self._sent.get(ref, 0) + count

    def read(self, *live: tuple[str, int]) -> dict[str, int]:
        """The bytes counted, plus ``live`` (ref, bytes) pairs not counted yet (the live
        sessions' own counts, which are added here when the session ends)."""
        with self._lock:
            out = dict(self._sent)
        for ref, count in live:
            out[ref] = out.get(ref, 0) + count
        return out


class RateBudget:
    """A rate that many senders share, from any thread: each asks, before it sends ``n``
    bytes, how long to wait (:meth:`reserve`). Reservations are served in the order they
    come, at ``bits_per_second`` in all, with up to ``burst`` bytes at once after a quiet
    spell."""

    def __init__(
        self,
        bits_per_second: int,
        burst: int = 256 << 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = bits_per_second / 8  # bytes/s
        self.slack = burst / self.rate
        self.clock = clock
        self._lock = threading.Lock()
        self._free = 0.0  # when what was reserved has gone out

    def reserve(self, n: int) -> float:
        """Seconds to wait before sending ``n`` bytes (0: at once)."""
        with self._lock:
            now = self.clock()
            self._free = max(self._free, now) + n / self.rate
            return max(0.0, self._free - now - self.slack)


@runtime_checkable
class Paced(Protocol):
    """A transport whose nodes' HTTP chunk fetches share a rate (multicast's catch-ups,
    which must not take the server link from the session itself)."""

    def pacer(self, deployment: int, ref: str) -> RateBudget | None: ...


@runtime_checkable
class Joinable(Protocol):
    """A transport whose session starts once its nodes said they joined it (multicast's
    acknowledged sessions: see :meth:`~corral.deploy.transports.multicast.Session.\
start_when_joined`)."""

    def joined(self, deployment: int, node: str, tag: str) -> bool: ...


def url_host(url: str) -> str:
    """The host part of ``url`` (what nodes connect to), ``localhost`` if it has none."""
    return urlsplit(url).hostname or "localhost"


Factory = Callable[[Settings], ServerTransport]
