"""Whom a node pulls from: the plan's chain (:class:`ChainParams`), the choice of upstream
(:class:`Picker`) and how far an upstream fell behind its own (:class:`LagWatch`)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.agent.errors import ReceiveError

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
#: Seconds over which a node's lag behind its upstream is watched: a lag that grew within
#: this window is a slow node; stalls further apart than this are forgotten.
LAG_WINDOW = 30.0
#: The upstream's pace is its holdings' growth over at least this many seconds.
PACE_SPAN = 2.0


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

    Each candidate reached by passing another is told whom (:attr:`passing`): that is
    how it knows it may hand its one successor slot over (the passed node was fed there;
    see :class:`~corral.agent.wire.chain_sender.Slot`). A node refused because that slot
    is taken, or because it was itself passed (:meth:`exile`), is nobody's upstream any
    more: it pulls from ``tail``, the last node of the chain, whose uplink feeds nobody,
    and if that fails takes the rest over HTTP; it never becomes a second successor.
    """

    def __init__(
        self,
        chain: list[Upstream],
        *,
        start_patience: float = START_PATIENCE,
        grace: float = RECONNECT_GRACE,
        max_walk: int = MAX_WALK,
        clock: Callable[[], float] = time.monotonic,
        tail: Upstream | None = None,
    ) -> None:
        if not chain or not chain[-1].head:
            raise ValueError("the chain of upstreams must end with the head")
        self.chain = chain
        self.tail = tail
        #: the node passed to come to the current candidate ("" if none)
        self.passing = ""
        self.exiled = False
        self.http_rest = False
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
        return None if self.http_once or self.http_rest else self.chain[self.index]

    def farther(self) -> Upstream | None:
        """The node a lagging upstream would be passed for (the head too: it hands its
        slot over, so the server still sends the session one stream)."""
        if self.exiled:
            return None
        return self.chain[self.index + 1] if self.index + 1 < len(self.chain) else None

    def exile(self, feeding: bool = False) -> None:
        """Refused as a second successor, or passed by its own successor: the tail once
        (if it is not that which refused), then HTTP for the rest. A node that still
        feeds a successor (``feeding``: it was passed by a node that was not its
        successor) takes the rest over HTTP at once: the tail is behind it in the chain,
        and pulling from there, each would wait for the other."""
        refused = self.chain[self.index]
        if feeding or self.exiled or self.tail is None or refused.name == self.tail.name:
            self.http_rest = True
            return
        self.exiled = True
        self.chain = [self.tail, self.chain[-1]]
        self.index, self.passing, self.since, self.walked = 0, "", None, 0
        self.contact = False
        self.switches += 1

    def answered(self) -> None:
        """The current candidate accepted the connection: it has started."""
        self.contact = True
        self.walked = 0

    def succeeded(self) -> None:
        """The current upstream delivered bytes: its next failure is a new one. (Counted
        from a whole chunk instead, a slow node's failures from before its upstream was
        up still counted when that upstream cut it off, hours of its pace later: it
        passed that live upstream at once and took its slot, see :meth:`exile`.)"""
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
            self.passing = self.chain[self.index].name
            self.index += 1
            if self.walked >= self.max_walk:
                self.index = len(self.chain) - 1
            if self.exiled and self.chain[self.index].head:
                self.http_rest = True  # the head feeds the chain's first node, not us
            self.switches += 1
            self.contact = self.chain[self.index].head
        self.since = None


@dataclass(frozen=True)
class ChainParams:
    """The plan's ``transport.params`` for ``chain`` (made by
    :mod:`corral.deploy.transports.chain`)."""

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

    def tail(self) -> Upstream | None:
        """The chain's last node (with an address), where a node passed by its successor
        goes: its uplink feeds nobody. None if that is this node."""
        for name, ip in reversed(self.members[self.position + 1 :]):
            if ip:
                return Upstream(name, (ip, self.relay_port))
        return None

    def upstreams(self) -> list[Upstream]:
        """The nodes before this one, nearest first (those with an address), then the head."""
        chain = [
            Upstream(name, (ip, self.relay_port))
            for name, ip in reversed(self.members[: self.position])
            if ip
        ]
        return [*chain, Upstream("head", self.head, head=True)]


class LagWatch:
    """How far a node fell behind its upstream lately, in *seconds* of the upstream's
    pace, not in bytes (a byte count means 2 s on one link and 16 s on another).

    Each frame says what the upstream held and when it sent the frame, by its own clock.
    Behind it, in seconds: ``what the upstream holds - what we hold`` at its pace, plus how
    much longer than the first frame the frames now take to arrive. The second part is
    the bytes queued ahead of a slow link: at a tenth of the chain's rate, seconds during
    which ``have`` is old news. The offset between the two clocks cancels out.

    What counts is the growth of that above the least it was in the last ``window``
    seconds: a node that started late, or just moved to an upstream further ahead, lags
    as much as that and no more and is as fast as any, whereas a slow node's lag grows.
    The pace is the best growth of the upstream's holdings over ``span`` seconds of its
    clock seen on this connection: a node that fell 8 s behind is 8 s behind at 2 Mbit/s
    as at 10 Gbit/s. Until a pace is known (an upstream that already held everything)
    nothing is judged: 0."""

    def __init__(
        self,
        window: float = LAG_WINDOW,
        span: float = PACE_SPAN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.span = span
        self.clock = clock
        #: (arrival, sent: s of the upstream's clock since the first frame, upstream holds
        #: in KiB, behind in KiB, frames' extra delay in s)
        self.samples: collections.deque[tuple[float, float, int, int, float]] = collections.deque()
        self.pace = 0.0  # KiB/s
        self.least = 0.0  # the least of the window's samples behind, in s
        self.first: tuple[float, int] | None = None  # (arrival, sent in ms) of the first

    def growth(self, upstream_holds: int, holds: int, sent_ms: int | None = None) -> int:
        """Milliseconds the node fell behind lately (both holdings in KiB; ``sent_ms``, the
        frame's stamp by the upstream's clock; without it, the arrival time stands in)."""
        now = self.clock()
        if self.first is None:
            self.first = (now, 0 if sent_ms is None else sent_ms)
        if sent_ms is None:
            sent = now - self.first[0]
        else:
            sent = ((sent_ms - self.first[1]) & 0xFFFFFFFF) / 1000
        delay = (now - self.first[0]) - sent
        current = (now, sent, upstream_holds, upstream_holds - holds, delay)
        samples = self.samples
        if not samples or now - samples[-1][0] >= self.span / 8:  # the sums: 4 times a second
            samples.append(current)
            while len(samples) > 1 and now - samples[0][0] > self.window:
                samples.popleft()
            for _, then, held, _, _ in samples:
                if sent - then < self.span:
                    break
                self.pace = max(self.pace, (upstream_holds - held) / (sent - then))
            if self.pace > 0:
                self.least = min(s[3] / self.pace + s[4] for s in samples)
        if self.pace <= 0:
            return 0
        behind = current[3] / self.pace + delay
        return int(max(0.0, behind - min(self.least, behind)) * 1000)
