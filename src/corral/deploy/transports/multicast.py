"""The ``multicast`` transport: one udpcast session per image, sent about once on the wire.

For each transfer session (the nodes of one deployment that get the same image) corral
starts one ``udp-sender`` that sends the image's stream export, the chunk files in order,
fed through a FIFO so that no copy of the stream is made. The agent's side
(:mod:`corral.agent.receivers.multicast`) runs ``udp-receiver``, checks each chunk against the
plan before it is unpacked, and finishes by HTTP from the first chunk it lacks when it
joined late, was dropped, left or saw a bad chunk: the session goes on without it and it
catches up afterwards through the ordinary chunk route (which serves any node whose
running deployment installs that image, whatever its transport).

Sessions never mix: each has its own rendezvous address, data address and port pair,
derived from the deployment id and the image (:func:`channel_for`), and the plan tags it
with the deployment, the image ref and the stream's sha256. What makes a mixed-up or
rejoining node safe is the plan itself: every chunk's sha256 is in it and the agent
unpacks nothing that does not match, so a node can never take another session's data.

A session runs in one of two modes (``multicast_mode``, :class:`MulticastOptions`):
acknowledged, the default, described below; or async, where udp-sender never waits for a
receiver and each node repairs by HTTP the chunks that lost a slice FEC could not rebuild
(:mod:`corral.agent.receivers.multicast_async`). What udpcast 20120424 does in async mode,
read in its source and tried on two network namespaces (8 MiB at 20 Mbit/s, 5 % loss on
the sender's side, 8x4/128):

- a slice that FEC cannot rebuild ends udp-receiver (exit 1, after printing the slice's
  missing-block map) unless it runs with ``--ignore-lost-data``; with it, udp-receiver
  marks the slice done and writes it in its place, the lost blocks holding zeros or stale
  bytes of its buffer (receivedata.c, ``findSlice`` and ``fakeSliceComplete``): the
  output had every byte at its offset and the full length, with 284 damaged 1456-byte
  blocks. A chunk's sha256 then finds the damage, and the chunk alone is fetched again;
- the receivers never connect: an async receiver waits for the sender's hello (sent only
  while it waits, every ``--rexmit-hello-interval``) and then listens; the sender counts
  nobody, so ``--min-receivers`` and ``--max-wait`` mean nothing and it starts after
  ``--autostart`` hellos. corral therefore launches it only once the session's nodes have
  asked for their plans (:meth:`Session.start_when_ready`);
- a receiver started after the first slice never hears a hello and writes nothing (tried:
  started 5 s in, it waited until its timeout). With ``--streaming`` the sender repeats
  its hello in every slice, and a late receiver wrote the stream from the start of the
  first whole slice it caught (byte 2 981 888, slice 2) to the end, with nothing telling
  where it began. corral does not use that yet: a late node takes the stream by HTTP, as
  in acknowledged mode.

Acknowledged mode stays the default: measured with ``bench/deploy.py --nodes 100
--size-mib 32 --link 2mbit --server-link 20mbit`` (S/B = 125 s, the 2-core host), async
mode took longer in every scenario and sent less only under loss::

    scenario           acked: T / (S/B)  egress / S   async: T / (S/B)  egress / S
    -                  1.50              1.14         1.59-1.61 (3)     1.19
    1 % loss           1.66              1.26         1.72              1.19
    tb050 at B/10      1.56 (others)     1.22         1.66 (others)     1.24

No node repaired a chunk in any async run: 8x8/128 absorbed the 1 % loss whole, where
acknowledged mode retransmitted 0.12 x S. What async mode pays is fixed: 3 % more FEC
than 8x4/128, and a start 3 s after the last node's plan plus 2 s of hellos where the
acknowledged sender starts when the last receiver connects. What it saves, the wait for
slow receivers, was small here: the acknowledged sender lost 0.06 to a node at a tenth of
the rate (it leaves within its 15 s judgement), and the async stream itself ran no faster
(about 1.6 Mbit/s of data, a 1.49 MB slice every 7.5 s in its sender's log, the rate
docs/benchmarks.md gives for acknowledged mode at N = 100).

How udpcast is driven in acknowledged mode, and why (measured on 3-10 network namespaces
with tbf-shaped 20 Mbit/s links, 16 MiB, udpcast 20120424):

- acknowledged mode (not ``--async``): receivers tell the sender what they miss, so loss
  costs retransmissions rather than failed nodes, and ``--min-receivers`` works (in async
  mode receivers never connect, so the sender cannot know when they are there);
- ``--retries-until-drop``: udpcast's default (200) held a session for minutes behind a
  killed receiver. The sender's REQACK timeout is 1.1 x its running average answer time
  (~10 ms on a LAN) for the first ten retries and one second more for each after, so 12
  drops a dead receiver after about 2-3 s (measured: a killed receiver cost the others
  3.3 s; with 15, 6.5 s). A live receiver answers every REQACK, so only a process that is
  not scheduled for seconds or twelve losses in a row get a false drop, which costs one
  unicast catch-up, not a failure;
- the start: the transfer starts as soon as every node said it joined (its agent reports
  udp-receiver's "Connected"), or ``max_wait`` seconds after the first one did; a node
  later than that catches up by HTTP. corral gives the start on udp-sender's console
  (its stdin): udp-sender's own count (``--min-receivers``) includes a node whose connect
  reply was lost, and starting on it left that node out of the session, which then took
  the whole image over HTTP (:meth:`Session.start_when_joined`);
- ``--max-bitrate``: there is no congestion control in udpcast. Faster than the slowest
  link, that node's drops become retransmissions that every node receives (no limit on
  20 Mbit/s links: 158 % egress instead of 104 %);
- ``--fec``: in acknowledged mode too, the sender adds redundancy blocks to each stripe,
  and a retransmission of FEC blocks repairs different losses at different receivers.
  With N receivers each losing p of the packets, a block is lost by somebody with
  probability 1 - (1 - p)^N (63 % at N = 100, p = 1 %): without FEC that many blocks go
  out twice. ``8x4/128`` (3 % more) covers a stripe's expected ~1.3 lost blocks at 1 %
  loss for nearly every receiver;
- a node whose link cannot carry the session's rate would hold everyone to its pace
  (acknowledged mode waits for the slowest): measured, one 2 Mbit/s node took a 20 Mbit/s
  session from 9 s to 72 s and 650 % egress. Its agent sees its own interface receive far
  less than ``max_bitrate`` while the others see close to it (retransmissions for the
  slow one reach everybody), and leaves below ``leave_below`` of the rate: it tells the
  sender it leaves (udp-receiver's SIGINT, no drop pause) and finishes by HTTP.
  It judges that on a window of ``leave_window`` seconds and of at least three slices
  (:attr:`~corral.deploy.transports.multicast_options.MulticastOptions.judge_window`),
  never on the session's first seconds;
- the HTTP catch-ups of a session (nodes that left, were dropped or came late) share
  ``catchup_bitrate`` in all, enforced where corral serves the chunks
  (:meth:`MulticastTransport.pacer`, read by the chunk route): however many nodes catch
  up, they never take the server's link from the session itself;
- a node that comes after the session started sending gets no session in its plan and
  takes the whole stream over HTTP (within that budget). udpcast cannot do better: a
  udp-receiver started in the middle of an acknowledged session exits at once with
  "Receiver error" and writes nothing (tried with udpcast 20120424, 3 MB at 1 Mbit/s, the
  second receiver started 8 s in), and it writes its output in order from byte 0 only,
  to a pipe here. Taking the rest from the
  session and only the missed head by HTTP would need a receiver that writes at offsets
  (into a file, not a pipe) and a sender that lets late receivers in: uftp (NAK-based,
  in Debian), or udpcast's async mode with FEC and an HTTP repair of what was missed.

Measured with ``bench/deploy.py --transports multicast --size-mib 16`` (S = 13.8 MiB,
node links B = 20 Mbit/s, server 200 Mbit/s, S/B = 5.8 s, 2-core host; the bench's T
counts from the first node's first report, so it includes the agents' start and
partitioning, and a session starts when its last node is ready)::

    N   scenario             T (s)  T / (S/B)  egress / S  the stream itself    CPU
    10  -                    11.2   1.93       1.09        6.6 s (1.14 x S/B)   59 %
    10  1 % loss             11.0   1.90       1.11        6.7-7.0 s            58 %
    10  tb010 at 2 Mbit/s    72.0   12.4       2.67        others 10.4 s        23 %
    10  tb010 killed at 50%  14.8   2.55       1.09        others 9.7 s         22 %
    50  -                    50.9   8.77       1.15        8.8-9.3 s            96 % (invalid)

The stream takes 1.14 x S/B: 19 of 20 Mbit/s, 4 % of headers, 3 % of FEC. At N = 50 all
nodes got every chunk by multicast, but the saturated host brought them to "receiving"
over 32 s and unpacked at 13 Mbit/s. The slow node left after 6 s (its 2 Mbit/s made the
others' stream 3.8 s longer; its own copy came by HTTP); the killed node cost the others
the 3 s drop pause and was reported failed after 30 s.

Site settings would belong in corral.toml; until they are there (see
:func:`~corral.deploy.transports.multicast_options.options_from_settings`),
:data:`~corral.deploy.transports.multicast_options.DEFAULT_OPTIONS` holds them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import Settings
from corral.deploy.transports.base import Member, Meter, NotReady, RateBudget
from corral.deploy.transports.http import HttpTransport
from corral.deploy.transports.multicast_options import MulticastOptions, options_from_settings
from corral.errors import CommandFailed, ConfigError
from corral.images.exports import Chunked
from corral.run import run, spawn, stop

log = logging.getLogger("corral.deploy")

#: Rendezvous and data groups live in 239.192.0.0/14, the organisation-local scope of
#: RFC 2365 (never routed off the site); the two /16s differ in the bits Ethernet maps to
#: a multicast MAC, so a node's NIC filters each session's groups apart.
RDV_PREFIX = "239.194"
DATA_PREFIX = "239.195"
#: Session slots: slot k uses ports PORT_BASE + 2k and + 1, below Linux's ephemeral range
#: (32768-60999), so no client socket on the server holds them.
PORT_BASE = 24000
SLOTS = 4096
#: Images of one deployment spread over this many neighbouring slots; deployments whose
#: ids differ by less than SLOTS / IMAGE_SPREAD never share a slot.
IMAGE_SPREAD = 16
#: What the sender writes to its log every this many milliseconds (bytes, retransmits).
STAT_PERIOD_MS = 5000
#: The sender repeats its HELLO this often (ms) while it waits for its nodes: without it a
#: transfer began about 1.7 s after the last node connected, with it at once (measured
#: with 3 receivers waiting: 9.8 s -> 8.0 s for 16 MiB at 19 Mbit/s).
HELLO_INTERVAL_MS = 200
#: Seconds an async session waits after the last of its nodes asked for its plan before
#: it starts: a node partitions its disk between its plan and udp-receiver's start (at
#: most 2 s apart at N = 100 on the benchmark's host), and one that is not listening when
#: the first slice goes out takes the whole stream by HTTP.
ASYNC_SETTLE = 3.0
#: How often a session not started yet looks again whether it should start, for what
#: only time makes true (``max_wait``, ``min_wait``, the settle): a node that asks or
#: joins makes it look at once.
START_POLL = 0.2
#: Seconds udp-sender must live after its start to count as started.
STARTUP_CHECK = 0.3
#: Grace for udp-sender to exit on SIGTERM before it is killed.
STOP_GRACE = 5.0


# --- addresses --------------------------------------------------------------------------


@dataclass(frozen=True)
class Channel:
    """Where one session meets: rendezvous group, data group, port pair."""

    slot: int
    rdv: str
    data: str
    portbase: int


def channel(slot: int) -> Channel:
    slot %= SLOTS
    low = f"{slot >> 8}.{slot & 0xFF}"
    return Channel(slot, f"{RDV_PREFIX}.{low}", f"{DATA_PREFIX}.{low}", PORT_BASE + 2 * slot)


def preferred_slot(deployment: int, ref: str) -> int:
    """The slot a session asks for: deployments in a row get slots IMAGE_SPREAD apart, the
    images of one deployment a spot among those by a hash of the ref (stable across
    restarts, unlike Python's hash)."""
    spot = int(hashlib.sha256(ref.encode()).hexdigest()[:8], 16) % IMAGE_SPREAD
    return (deployment * IMAGE_SPREAD + spot) % SLOTS


def channel_for(deployment: int, ref: str, taken: set[int]) -> Channel:
    """The session's channel: its preferred slot, or the next one no live session holds."""
    slot = preferred_slot(deployment, ref)
    for step in range(SLOTS):
        candidate = (slot + step) % SLOTS
        if candidate not in taken:
            return channel(candidate)
    raise ConfigError(f"all {SLOTS} multicast session slots are in use")


# --- the server's interface -------------------------------------------------------------


def interface_holding(address: str, addr_json: str) -> str | None:
    """The interface that holds ``address``, from ``ip -j -4 addr show``."""
    for link in json.loads(addr_json or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") == address:
                return str(link["ifname"])
    return None


def route_interface(route_json: str) -> tuple[str, str] | None:
    """(device, source address) of ``ip -j route get``'s answer."""
    routes = json.loads(route_json or "[]")
    if not routes or "dev" not in routes[0]:
        return None
    return str(routes[0]["dev"]), str(routes[0].get("prefsrc", ""))


def find_interface(address: str, peers: Sequence[str | None]) -> tuple[str, str]:
    """(interface, its address) that the sender uses: the one holding corral's listen
    address, or, when corral listens on every address, the one the route to the first
    node leaves by."""
    if address not in ("", "0.0.0.0"):
        name = interface_holding(address, run(["ip", "-j", "-4", "addr", "show"]).stdout)
        if name is None:
            raise ConfigError(
                f"no interface of this machine holds address {address}",
                "set 'address' in corral.toml to the server's address on the nodes' network",
            )
        return name, address
    for peer in peers:
        if not peer:
            continue
        try:
            found = route_interface(run(["ip", "-j", "route", "get", peer]).stdout)
        except CommandFailed:
            continue
        if found is not None:
            return found
    raise ConfigError(
        "cannot tell which interface reaches the nodes for multicast",
        "set 'address' in corral.toml to the server's address on the nodes' network",
    )


# --- one session ------------------------------------------------------------------------


@dataclass
class Session:
    """One udp-sender and the thread that feeds it the stream through a FIFO."""

    deployment: int
    payload: Chunked
    channel: Channel
    interface: str
    options: MulticastOptions
    directory: Path
    members: dict[str, str | None]
    tag: str
    chunks: int
    proc: subprocess.Popen[bytes] | None = None
    feeder: threading.Thread | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    fed: int = 0  # bytes written into the FIFO
    #: where the fed bytes are counted for /metrics (the transport's, kept past the session)
    meter: Meter = field(default_factory=Meter)
    #: what the session's HTTP catch-ups share (the chunk route waits on it)
    budget: RateBudget | None = None
    log_start: int = 0  # where this sender's lines begin in the (appended) log
    #: async mode: when each member first asked for its plan (time.monotonic())
    asked: dict[str, float] = field(default_factory=dict)
    #: acknowledged mode: when each member said its udp-receiver joined the session
    joined: dict[str, float] = field(default_factory=dict)
    #: set when a member asks or joins, and on stop: the starter looks again
    changed: threading.Event = field(default_factory=threading.Event)
    starter: threading.Thread | None = None
    launching: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stem(self) -> str:
        kind = "" if self.payload.export == "stream" else f"-{self.payload.export}"
        return f"d{self.deployment}-{self.payload.name}-{self.payload.version}{kind}"

    @property
    def fifo(self) -> Path:
        return self.directory / f"{self.stem}.fifo"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.stem}.log"

    @property
    def pid_path(self) -> Path:
        return self.directory / f"{self.stem}.pid"

    def argv(self) -> list[str]:
        c = self.channel
        return [
            "udp-sender",
            "--file",
            str(self.fifo),
            "--interface",
            self.interface,
            "--portbase",
            str(c.portbase),
            "--mcast-rdv-address",
            c.rdv,
            "--mcast-data-address",
            c.data,
            *self.options.sender_args(len(self.members)),
            "--rexmit-hello-interval",
            str(HELLO_INTERVAL_MS),
            # acknowledged mode: corral starts it through its console (its stdin)
            *(["--nokbd"] if self.options.mode == "async" else []),
            "--stat-period",
            str(STAT_PERIOD_MS),
        ]

    def launch(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _kill_stale(self.pid_path)
        self.fifo.unlink(missing_ok=True)
        os.mkfifo(self.fifo, 0o600)
        # acknowledged mode: a byte on its stdin (the console it reads when its input is
        # a file) starts the transfer; so would the pipe's end, should corral go away
        console = subprocess.DEVNULL if self.options.mode == "async" else subprocess.PIPE
        with open(self.log_path, "ab") as out:
            self.log_start = out.tell()
            self.proc = spawn(
                self.argv(), stdin=console, stdout=subprocess.DEVNULL, stderr=out.fileno()
            )
        self.pid_path.write_text(f"{self.proc.pid}\n")
        self.feeder = threading.Thread(
            target=self._feed, name=f"corral-mcast-{self.stem}", daemon=True
        )
        self.feeder.start()
        log.info(
            "deployment %d: udp-sender for %s on %s (%s, rdv %s, ports %d-%d), pid %d",
            self.deployment,
            self.payload.ref,
            self.interface,
            self.channel.data,
            self.channel.rdv,
            self.channel.portbase,
            self.channel.portbase + 1,
            self.proc.pid,
        )

    def start_when_ready(self) -> None:
        """Async mode: launch udp-sender from a thread once every node of the session
        (``min_receivers`` of them, if set) has asked for its plan and
        :data:`ASYNC_SETTLE` seconds passed since the last did, or ``max_wait`` seconds
        after the first asked. The nodes' receivers are listening by then; udp-sender
        sends its hellos (``--autostart``) and goes."""
        self._start_thread(self._start_when_ready)

    def start_when_joined(self) -> None:
        """Acknowledged mode: udp-sender runs and answers its nodes from now on, and a
        thread starts its transfer once every node of the session (``min_receivers`` of
        them, if set, and not before ``min_wait``) has said it joined
        (:meth:`note_joined`), or ``max_wait`` seconds after the first did.

        Why the nodes' word and not udp-sender's count: a receiver is counted when its
        connect request arrives, and learns it is in only from the reply. A receiver
        whose reply is lost asks again at the sender's next hello, but the sender sends
        none once its count is full: it starts, and that node waits for a session that
        left without it, then takes the whole image over HTTP while the sender drops it.
        At N = 100 with 1 % loss that was one or two nodes a run (bench/deploy.py). Held
        until the nodes said they are in, the sender keeps sending hellos, and a node
        whose reply was lost asks again within :data:`HELLO_INTERVAL_MS`."""
        self._start_thread(self._start_when_joined)

    def _start_thread(self, target: Callable[[], None]) -> None:
        self.starter = threading.Thread(
            target=target, name=f"corral-mcast-start-{self.stem}", daemon=True
        )
        self.starter.start()

    def note_asked(self, node: str) -> None:
        self.asked.setdefault(node, time.monotonic())
        self.changed.set()

    def note_joined(self, node: str) -> None:
        self.joined.setdefault(node, time.monotonic())
        self.changed.set()

    def ready(self, now: float) -> bool:
        """Whether the session should start now: async mode when its nodes asked for
        their plans (see :meth:`start_when_ready`), acknowledged mode when they joined
        (:meth:`start_when_joined`)."""
        if self.options.mode == "async":
            seen, settle = list(self.asked.values()), ASYNC_SETTLE
        else:
            seen, settle = list(self.joined.values()), 0.0
        if not seen:
            return False
        since = now - min(seen)
        if since >= self.options.max_wait:
            return True
        wanted = min(self.options.min_receivers or len(self.members), len(self.members))
        return len(seen) >= wanted and now - max(seen) >= settle and since >= self.options.min_wait

    def _wait_until_ready(self) -> bool:
        """Wait for :meth:`ready`; False if the session stops first."""
        while True:
            self.changed.clear()
            if self.stopping.is_set():
                return False
            if self.ready(time.monotonic()):
                return True
            self.changed.wait(START_POLL)

    def _start_when_ready(self) -> None:
        if not self._wait_until_ready():
            return
        with self.launching:
            if self.stopping.is_set():
                return
            self.launch()
        if not self.wait_started(STARTUP_CHECK):
            log.error(
                "deployment %d: udp-sender for %s exited at once (%s): its nodes use HTTP",
                self.deployment,
                self.payload.ref,
                " / ".join(self.said().strip().splitlines()[-2:]) or "no output",
            )

    def _start_when_joined(self) -> None:
        if not self._wait_until_ready():
            return
        joined = list(self.joined.values())
        log.info(
            "deployment %d: %d of %d nodes joined the session for %s%s: starting it",
            self.deployment,
            len(joined),
            len(self.members),
            self.payload.ref,
            f" over {max(joined) - min(joined):.1f} s" if joined else "",
        )
        self.go()

    def go(self) -> None:
        """Start the transfer: a key on udp-sender's console (acknowledged mode)."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.closed:
            return
        try:
            proc.stdin.write(b"\n")
            proc.stdin.close()
        except (OSError, ValueError):  # udp-sender is gone, or corral is stopping it
            pass

    def launched(self) -> bool:
        return self.proc is not None

    def _feed(self) -> None:
        """Write the chunk files, in order, into the FIFO udp-sender reads."""
        fd = self._open_fifo()
        if fd is None:
            return
        try:
            with os.fdopen(fd, "wb") as out:
                for index in range(self.chunks):
                    if self.stopping.is_set():
                        return
                    with open(self.payload.chunk_path(index), "rb") as chunk:
                        while block := chunk.read(1 << 20):
                            out.write(block)
                            self.fed += len(block)
                            self.meter.add(self.payload.ref, len(block))
        except BrokenPipeError:
            if not self.stopping.is_set():
                log.warning("udp-sender for %s stopped reading its input", self.payload.ref)
        except OSError as exc:
            log.error("feeding udp-sender for %s: %s", self.payload.ref, exc)

    def _open_fifo(self) -> int | None:
        """The FIFO's write end, once udp-sender has opened it; None if it never does."""
        while not self.stopping.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.EINTR):
                    log.error("opening %s: %s", self.fifo, exc)
                    return None
            else:
                os.set_blocking(fd, True)
                return fd
            if self.proc is not None and self.proc.poll() is not None:
                return None
            self.stopping.wait(0.05)
        return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_started(self, seconds: float) -> bool:
        """False if udp-sender exits within ``seconds`` (a port in use, a bad option)."""
        if self.proc is None:
            return False
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def said(self) -> str:
        """What this udp-sender wrote to its log so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode("utf-8", "replace").replace("\r", "\n")
        except OSError:
            return ""

    def transmitting(self) -> bool:
        """True once udp-sender started sending: a node that comes now is too late."""
        return "Starting transfer" in self.said()

    def stop(self) -> None:
        self.stopping.set()
        self.changed.set()
        with self.launching:  # an async session's starter launches nothing after this
            pass
        if self.proc is not None:
            stop(self.proc, STOP_GRACE)
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()  # not before: its end would start a transfer
            said = self.said()
            stats = [line.strip() for line in said.splitlines() if line.startswith("bytes=")]
            log.info(
                "deployment %d: udp-sender for %s ended (exit %s, %d bytes fed, %d of %d "
                "receivers dropped; %s)",
                self.deployment,
                self.payload.ref,
                self.proc.returncode,
                self.fed,
                said.count("Dropping client"),
                said.count("New connection"),
                stats[-1] if stats else "sent nothing",
            )
        if self.starter is not None and self.starter is not threading.current_thread():
            self.starter.join(timeout=STOP_GRACE)
        # a feeder still blocked on opening the FIFO sees the stop flag within 50 ms
        if self.feeder is not None:
            self.feeder.join(timeout=STOP_GRACE)
        self.fifo.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)


def _kill_stale(pid_path: Path) -> None:
    """Kill the udp-sender a crashed corral serve left for this session (it holds the
    session's ports); only if that pid still runs udp-sender."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if cmdline and os.path.basename(cmdline[0]) == b"udp-sender":
        log.warning("killing a udp-sender left from a previous run (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- the transport ----------------------------------------------------------------------


class MulticastTransport:
    """udp-sender per session; HTTP (see :class:`HttpTransport`) for nodes catching up."""

    name = "multicast"
    export = "stream"

    def __init__(self, settings: Settings, options: MulticastOptions | None = None) -> None:
        if shutil.which("udp-sender") is None:
            raise ConfigError(
                "udp-sender is not installed: the multicast transport needs udpcast",
                "apt-get install udpcast (or run 'make setup')",
            )
        self.settings = settings
        self.options = options or options_from_settings(settings)
        self.http = HttpTransport(settings)
        self.directory = settings.home / "multicast"
        self.sessions: dict[tuple[int, str], Session] = {}
        #: what udp-sender was fed, once: its retransmissions and the HTTP catch-up are not
        self.meter = Meter()
        self._lock = threading.Lock()

    def prepare(self, payload: Chunked) -> None:
        self.http.prepare(payload)

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None:
        key = (deployment, payload.ref)
        with self._lock:
            old = self.sessions.pop(key, None)
            if old is not None:
                old.stop()
            taken = {s.channel.slot for s in self.sessions.values()}
            interface, _ = find_interface(self.settings.address, [m.ip for m in members])
            index = payload.index()
            session = Session(
                deployment=deployment,
                payload=payload,
                channel=channel_for(deployment, payload.ref, taken),
                interface=interface,
                options=self.options,
                directory=self.directory,
                members={m.node: m.ip for m in members},
                tag=f"{deployment}/{payload.image.ref}/{index['sha256']}",  # as the plan says
                chunks=len(index["chunks"]),
                meter=self.meter,
                budget=RateBudget(self.options.catch_up_rate),
            )
            if self.options.mode == "async":
                session.start_when_ready()
            else:
                session.launch()
                session.start_when_joined()
            self.sessions[key] = session
        if self.options.mode == "async":
            return  # its starter checks that udp-sender lives, once it launches it
        if not session.wait_started(STARTUP_CHECK):
            # not fatal: params() then sends the session's nodes to HTTP
            log.error(
                "deployment %d: udp-sender for %s exited at once (%s): its nodes use HTTP",
                deployment,
                payload.ref,
                " / ".join(session.said().strip().splitlines()[-2:]) or "no output",
            )

    def _session_of(self, ref: str, node: str) -> Session | None:
        with self._lock:
            for (_, session_ref), session in self.sessions.items():
                if session_ref == ref and node in session.members:
                    return session
        return None

    def params(self, payload: Chunked, node: str) -> dict[str, Any]:
        """The HTTP base for catching up, and the session to join while it still waits
        for its nodes (None once it started sending or ended: the node then goes straight
        to HTTP). :class:`NotReady` while the node's session is not started yet (the
        manager starts it on its next pass, once the image's export is made): a node
        that asks that early waits for it rather than take the image over HTTP."""
        params = self.http.params(payload, node)
        session = self._session_of(payload.ref, node)
        if session is None:
            raise NotReady(f"no multicast session for {payload.ref} with node {node} yet")
        o = session.options
        if o.mode == "async":
            # launched: its hellos may be over before this node listens (see the module
            # docstring): the node takes HTTP
            if session.launched():
                return {**params, "session": None}
            session.note_asked(node)
        elif not session.running() or session.transmitting():
            return {**params, "session": None}
        c = session.channel
        return {
            **params,
            "session": {
                "tag": session.tag,
                "rdv": c.rdv,
                "data": c.data,  # the sender announces it; for the node's log
                "portbase": c.portbase,
                "interface": session.members.get(node) or "",
                "mode": o.mode,
                "max_bitrate": o.max_bitrate,
                "max_wait": o.max_wait,
                "leave_below": o.leave_below,
                "leave_window": o.judge_window,
            },
        }

    def joined(self, deployment: int, node: str, tag: str) -> bool:
        """``node`` says its receiver joined the session tagged ``tag``: counted toward
        that session's start (:meth:`Session.start_when_joined`). False when no session
        of the deployment has that tag and node."""
        with self._lock:
            found = [
                s
                for (ident, _), s in self.sessions.items()
                if ident == deployment and s.tag == tag and node in s.members
            ]
        for session in found:
            session.note_joined(node)
            log.debug("deployment %d: node %s joined the session for %s", deployment, node, tag)
        return bool(found)

    def pacer(self, deployment: int, ref: str) -> RateBudget | None:
        """The rate the session's HTTP catch-ups share, while its udp-sender runs (when
        it could not start, every node is on HTTP and there is no session to spare)."""
        with self._lock:
            session = self.sessions.get((deployment, ref))
        if session is None or not session.running():
            return None
        return session.budget

    def finish(self, deployment: int, payload: Chunked) -> None:
        with self._lock:
            session = self.sessions.pop((deployment, payload.ref), None)
        if session is not None:
            session.stop()

    def sent(self) -> dict[str, int]:
        return self.meter.read()

    def close(self) -> None:
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for session in sessions:
            session.stop()
        self.http.close()
