"""The ``multicast`` transport's options (:class:`MulticastOptions`): udp-sender's rate,
FEC, waits and the rest, from ``corral.toml`` and ``corral deploy``, checked before a
session starts. See :mod:`corral.deploy.transports.multicast`."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from corral.config import Settings
from corral.errors import InvalidValue

_FEC = re.compile(r"^(\d+)x(\d+)/(\d+)$")
#: udpcast's two ways to run a session (see :class:`MulticastOptions`, ``mode``)
MODES = ("acked", "async")
#: FEC when ``fec`` is None, per mode. Async mode has no second round, so its FEC alone
#: must absorb the loss: with p = 1 % per packet, a stripe of 128 + r blocks that loses
#: more than r is lost (Poisson, mean 1.3): r = 4 leaves 1.1 % of stripes, 8.6 % of the
#: slices of 8 stripes, each a chunk or two to fetch again; r = 8 leaves 2e-5 of stripes,
#: for 3 % more on the wire. Acknowledged mode retransmits what FEC missed, so 4 will do.
MODE_FEC = {"acked": "8x4/128", "async": "8x8/128"}
#: udpcast's data block (its default --blocksize) and its largest slice, in blocks: what
#: one slice of the session carries when FEC does not set it
BLOCK = 1456
SLICE_BLOCKS = 1024
#: Slices a node's rate is judged over, at the least: in acknowledged mode the sender
#: sends a slice, then waits for every receiver's answer, retransmits, and only then
#: goes on, so a rate seen over less than a few slices is that rhythm, not the link.
JUDGE_SLICES = 3
#: Hellos an async sender repeats (every HELLO_INTERVAL_MS of the transport) before its
#: first slice: its receivers are listening already when corral starts it, and a hello
#: lost is repeated 0.2 s later.
ASYNC_HELLOS = 10
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|bps|b)?$", re.IGNORECASE)


@dataclass(frozen=True)
class MulticastOptions:
    """udpcast's knobs for a site; see the module docstring for the measurements.

    ``mode``
        ``acked``: udpcast's acknowledged mode; the sender waits for every receiver's
        answer to each slice and retransmits what they lack, so it goes at the pace of
        the slowest (which leaves for HTTP when its link is the reason). ``async``: the
        sender never waits for a receiver; each receiver repairs a chunk that lost a
        slice FEC could not rebuild by fetching that chunk alone over HTTP (see
        :mod:`corral.agent.receivers.multicast_async`). ``acked`` is the default: at
        N = 100 it was faster with and without loss and with a slow node (the figures are
        in :mod:`corral.deploy.transports.multicast`).
    ``max_bitrate``
        bits/s on the wire (udpcast counts headers, FEC and retransmissions in it). It
        must stay under the slowest node link that should keep up: 19 Mbit/s fits the
        20 Mbit/s node links of ``corral testbed`` and the benchmark with tbf's slack; a
        gigabit site would set about 900 Mbit/s.
    ``fec``
        ``INTERLEAVExREDUNDANCY/STRIPESIZE``, "" for none, or None for the mode's
        (:data:`MODE_FEC`): in acknowledged mode 8x4/128 costs 3 % and absorbs 1 % loss at
        a hundred receivers without a second round for most stripes; async mode has no
        second round and takes 8x8/128.
    ``min_receivers``
        start as soon as this many nodes are connected (async mode: have asked for their
        plans); 0 means every node of the session.
    ``min_wait`` / ``max_wait``
        seconds after the first node connects: never start before ``min_wait`` (0: no
        reason to wait once all are there); start anyway at ``max_wait`` with those there.
        The wait only runs its course when a node is missing: one later than that costs
        one unicast copy, one that never comes (it failed before receiving) costs every
        node the wait. 60 s, because nodes booted together reached "receiving" over 3 s
        at N = 10 but over 32 s at N = 50 on the benchmark's 2-core host (30 s left 4 of
        50 to HTTP: 6 x S of egress).
    ``retries_until_drop``
        REQACKs without an answer before a receiver is dropped; 12 is about 2-3 s.
    ``leave_below`` / ``leave_window``
        a receiver whose interface got less than this fraction of ``max_bitrate`` in
        every second of the last ``leave_window`` seconds (and of at least
        :data:`JUDGE_SLICES` slices' time: :attr:`judge_window`) leaves the session for
        HTTP (0: never). 0.25, because the others measured 45-100 % of the rate in each
        second while one slow node held them back. 15 s, not the 5 s it was: at N = 100 on
        the benchmark's host, nodes that judged themselves on 5 s in the session's first
        tens of seconds (100 receivers answering each slice on two cores, host stalls of
        up to 9 s) left it by the dozen for HTTP, and their catch-ups then took the
        server link from the session, which made more nodes see a slow session (17.5 x S
        of egress). A window longer than the sender's pause to drop a dead receiver
        (2-3 s) and than such stalls, and of several slices at the session's rate (19 s at
        1.9 Mbit/s), sees the link and not the session's rhythm; a truly slow node costs
        the others about that long at its pace before it leaves (with a disconnect, no
        drop pause).
    ``catchup_bitrate``
        bits/s that the HTTP catch-ups of one session take in all, on the server's side
        (0: ``max_bitrate``, another session's worth). Nodes that left or came late fetch
        the rest of the stream over HTTP; without a limit, a few dozen of them share the
        server's link with the session itself, whose packets are then dropped at every
        receiver, which makes the session slower for all and more of them leave. Keep
        ``max_bitrate + catchup_bitrate`` under the server's link: with a server link ten
        times the nodes' (10 GbE for 1 GbE nodes), 5 to 8 times ``max_bitrate`` lets the
        catch-ups finish sooner.
    """

    mode: str = "acked"
    max_bitrate: int = 19_000_000
    fec: str | None = None
    min_receivers: int = 0
    min_wait: float = 0.0
    max_wait: float = 60.0
    retries_until_drop: int = 12
    leave_below: float = 0.25
    leave_window: float = 15.0
    catchup_bitrate: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidValue(
                f"multicast mode {self.mode!r} is not one of {', '.join(MODES)}",
                "acked: the sender waits for its slowest receiver; async: it never waits, "
                "and receivers repair what they lost over HTTP",
            )
        if self.max_bitrate < 100_000:
            raise InvalidValue(
                f"multicast max_bitrate {self.max_bitrate} bit/s is too low",
                "give the nodes' link rate in bits/s (e.g. 900m for gigabit)",
            )
        if self.fec:
            fec_parts(self.fec)
        if self.min_receivers < 0:
            raise InvalidValue(f"multicast min_receivers {self.min_receivers} is negative")
        if not 0 <= self.min_wait <= self.max_wait:
            raise InvalidValue(
                f"multicast min_wait {self.min_wait} and max_wait {self.max_wait}",
                "need 0 <= min_wait <= max_wait (seconds)",
            )
        if not 1 <= self.retries_until_drop <= 1000:
            raise InvalidValue(
                f"multicast retries_until_drop {self.retries_until_drop} is out of range",
                "give 1 to 1000 (12 drops a dead receiver in about 3 s)",
            )
        if not 0 <= self.leave_below < 1 or self.leave_window <= 0:
            raise InvalidValue(
                f"multicast leave_below {self.leave_below} / leave_window {self.leave_window}",
                "leave_below is a fraction in [0, 1), leave_window seconds > 0",
            )
        if self.catchup_bitrate and self.catchup_bitrate < 100_000:
            raise InvalidValue(
                f"multicast catchup_bitrate {self.catchup_bitrate} bit/s is too low",
                "give the rate the catch-ups may take of the server's link (e.g. 2g), "
                "or 0 for max_bitrate",
            )

    @property
    def fec_used(self) -> str:
        """udp-sender's ``--fec`` value: ``fec``, or the mode's ("" for none)."""
        return MODE_FEC[self.mode] if self.fec is None else self.fec

    @property
    def catch_up_rate(self) -> int:
        """Bits/s the HTTP catch-ups of one session share."""
        return self.catchup_bitrate or self.max_bitrate

    @property
    def judge_window(self) -> float:
        """Seconds over which a receiver's rate is judged: ``leave_window``, and at least
        :data:`JUDGE_SLICES` slices at ``max_bitrate``."""
        slice_seconds = self.slice_bytes * 8 / self.max_bitrate
        return max(self.leave_window, JUDGE_SLICES * slice_seconds)

    @property
    def slice_bytes(self) -> int:
        """Data bytes in one slice of the session (the last one may carry fewer)."""
        blocks = SLICE_BLOCKS
        if self.fec_used:
            interleave, _, stripe = fec_parts(self.fec_used)
            blocks = interleave * stripe
        return blocks * BLOCK

    def sender_args(self, members: int) -> list[str]:
        """udp-sender's options for these knobs, for a session of ``members`` nodes."""
        if self.mode == "async":
            return self._async_args()
        return self._acked_args(members)

    def _async_args(self) -> list[str]:
        """In async mode the receivers never connect (the sender answers nobody), so
        udp-sender cannot count them: corral starts it once its nodes are listening
        (:meth:`~corral.deploy.transports.multicast.Session.start_when_ready`), and it
        sends :data:`ASYNC_HELLOS` hellos, which is how an async receiver learns the
        session, before the first slice. ``--max-bitrate`` is required (udp-sender refuses
        async mode without a rate limit)."""
        args = ["--async", "--max-bitrate", str(self.max_bitrate), "--autostart", str(ASYNC_HELLOS)]
        if self.fec_used:
            args += ["--fec", self.fec_used]
        return args

    def _acked_args(self, members: int) -> list[str]:
        """udp-sender counts a receiver as there once it has its connect request, whether
        or not its reply arrived, and starts at once on that count: a node whose reply
        was lost is then left out of the session it was counted in. So it is never let
        start by count (``--min-receivers`` one above the session's nodes): corral starts
        it through its console, once the nodes themselves said they joined
        (:meth:`~corral.deploy.transports.multicast.Session.start_when_joined`, which
        keeps ``min_receivers`` and ``min_wait``). Its own ``--max-wait`` stays, should
        that never come."""
        args = [
            "--max-bitrate",
            str(self.max_bitrate),
            "--min-receivers",
            str(members + 1),
            "--max-wait",
            _seconds(self.max_wait),
            "--retries-until-drop",
            str(self.retries_until_drop),
        ]
        if self.fec_used:
            args += ["--fec", self.fec_used]
        return args


def fec_parts(text: str) -> tuple[int, int, int]:
    """(interleave, redundancy, stripe size) of a ``--fec`` value, checked.

    udp-sender takes any numbers and misbehaves on bad ones; its limits: a stripe has at
    most 128 data blocks, a slice (interleave x stripe size) at most 1024, and redundancy
    beyond the stripe size only wastes bandwidth.
    """
    match = _FEC.match(text.strip())
    if not match:
        raise InvalidValue(
            f"bad multicast fec '{text}'", "give INTERLEAVExREDUNDANCY/STRIPESIZE, e.g. 8x4/128"
        )
    interleave, redundancy, stripe = (int(g) for g in match.groups())
    if not (1 <= stripe <= 128 and 1 <= redundancy <= stripe and interleave >= 1):
        raise InvalidValue(
            f"bad multicast fec '{text}'",
            "stripe size 1-128, redundancy 1 to the stripe size, interleave at least 1",
        )
    if interleave * stripe > 1024:
        raise InvalidValue(
            f"bad multicast fec '{text}': a slice of {interleave * stripe} blocks",
            "interleave x stripe size must be at most 1024 (udpcast's largest slice)",
        )
    return interleave, redundancy, stripe


def parse_bitrate(value: str | int) -> int:
    """Bits/s from ``19000000``, ``"19m"``, ``"900mbit"``, ``"1g"``."""
    if isinstance(value, int):
        return value
    match = _RATE.match(value.strip())
    if not match:
        raise InvalidValue(f"bad multicast max_bitrate '{value}'", "e.g. 19m, 900mbit, 1g")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[unit])


#: The options corral uses until corral.toml has multicast keys.
DEFAULT_OPTIONS = MulticastOptions()


def options_from_settings(settings: Settings) -> MulticastOptions:
    """The options, from ``multicast_<knob>`` settings where corral's config has them.

    corral.toml has ``multicast_mode``, ``multicast_max_bitrate``, ``multicast_fec``
    (``auto``: the mode's), ``multicast_max_wait`` and ``multicast_catchup_bitrate``;
    any other field here becomes a key by adding ``multicast_<field>`` to
    :class:`~corral.config.Settings`.
    """
    values: dict[str, Any] = {}
    for f in fields(MulticastOptions):
        value = getattr(settings, f"multicast_{f.name}", None)
        if value is None:
            continue
        if f.name.endswith("bitrate"):
            if value == "":
                continue  # not set: the default
            value = parse_bitrate(value)
        if f.name == "fec" and value == "auto":
            continue  # the mode's
        values[f.name] = value
    return replace(DEFAULT_OPTIONS, **values)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
