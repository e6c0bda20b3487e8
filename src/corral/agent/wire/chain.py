"""The chain transport's wire protocol, version 2: hello, answer and frames.

Stdlib only: both ends import it, the node's relay (:mod:`corral.agent.receivers.chain`)
and the server's head (:mod:`corral.deploy.transports.chain`, which describes the
protocol byte by byte). What a sender does with it is in :mod:`corral.agent.wire.chain_sender`.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.agent.errors import AgentError

#: TCP port every node's relay listens on (each node has its own address, so one number
#: serves the whole chain; the head's port is the server's, in the plan).
RELAY_PORT = 7731
#: Bytes a relay reads before forwarding them: what a hop adds to the chain's latency
#: (6.5 ms at 20 Mbit/s; 100 hops, 0.7 s), against a Python loop turn per piece.
PIECE = 16 << 10
#: The most a frame carries: a sender that fell behind sends what piled up in bigger
#: frames (fewer turns), up to this.
FRAME_MAX = 64 << 10
#: A relay with nothing to send says so this often, so that silence means death.
HEARTBEAT = 1.0
#: Seconds without a byte from the upstream (heartbeats included) before it is dead.
SILENCE = 10.0
#: Seconds to wait for the other side's hello or its answer.
HELLO_TIMEOUT = 5.0
#: Socket buffers of relay connections (the kernel doubles them). The lag above travels in
#: the frames, behind the data queued in these buffers: small buffers keep it fresh (about
#: 1 MiB in flight: 8 ms at 1 Gbit/s, plenty on a LAN) and keep a hop's queue short.
SOCKET_BUFFER = 256 << 10
#: Unsent bytes a relay socket may queue (TCP_NOTSENT_LOWAT; a sender also waits for room
#: before it reads what to send): what a slow reader sees of the sender's state is that
#: much older (0.3 s at 2 Mbit/s, instead of seconds).
UNSENT = 64 << 10

MAGIC = b"CRLY"
#: 2: frames carry the sender's clock (``sent``)
VERSION = 2
#: answer statuses. BUSY: this end already feeds another successor of the chain (an
#: uplink feeds one). PASSED: the asking node was passed by its own successor, which took
#: its place here: it must not come back (see :class:`~corral.agent.wire.chain_sender.Slot`).
OK, WRONG_SESSION, CLOSING, BAD_HELLO, BUSY, PASSED = 0, 1, 2, 3, 4, 5
STATUS_TEXT = {
    OK: "ok",
    WRONG_SESSION: "wrong session",
    CLOSING: "closing",
    BAD_HELLO: "bad hello",
    BUSY: "feeds another successor",
    PASSED: "passed by its successor",
}
#: hello flags: the name of the node the downstream passed to come here follows its name
PASSING = 1
#: frame kinds
DATA, SKIP, IDLE = 1, 2, 3

_HELLO = struct.Struct("!4sBBH")  # magic, version, flags, tag length; tag
_HELLO_TAIL = struct.Struct("!IIB")  # next chunk, byte offset in it, name length; name
_NAME = struct.Struct("!B")  # with PASSING: length of the passed node's name; name
_ANSWER = struct.Struct("!4sBIH")  # magic, status, have, message length; message
#: kind, chunk, offset, length, have (KiB of the stream the sender holds), lag (how many
#: milliseconds the sender fell behind its own upstream lately: see ``LagWatch``), sent
#: (the sender's :func:`clock_ms` as it sent the frame: a receiver learns from it the
#: sender's pace and how long frames now wait on their way, which ``have`` alone hides)
FRAME = struct.Struct("!BIIIIII")


class ProtocolError(AgentError):
    """The other side said something this protocol does not allow."""


class Gone(AgentError):
    """The chunk asked for is older than anything the relay still holds."""

    def __init__(self, low: int) -> None:
        super().__init__(f"the window starts at chunk {low}")
        self.low = low


class Closed(AgentError):
    """The relay is shutting down."""


def session_tag(deployment: int, ref: str, stream_sha256: str) -> str:
    """What both ends of every connection must agree on: a node of another deployment, or
    one holding another image, is never served and never serves."""
    return f"{deployment}/{ref}/{stream_sha256}"


# --- framing -----------------------------------------------------------------------


def pack_hello(tag: str, index: int, name: str, offset: int = 0, passing: str = "") -> bytes:
    """``passing``: the node this one passed to come here (its upstream's successor)."""
    raw_tag, raw_name, raw_passing = tag.encode(), name.encode()[:255], passing.encode()[:255]
    tail = _NAME.pack(len(raw_passing)) + raw_passing if passing else b""
    return (
        _HELLO.pack(MAGIC, VERSION, PASSING if passing else 0, len(raw_tag))
        + raw_tag
        + _HELLO_TAIL.pack(index, offset, len(raw_name))
        + raw_name
        + tail
    )


@dataclass(frozen=True)
class Hello:
    tag: str
    index: int
    name: str
    offset: int = 0
    passing: str = ""


def read_hello(read: Callable[[int], bytes]) -> Hello:
    magic, version, flags, tag_len = _HELLO.unpack(read(_HELLO.size))
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a chain hello (magic {magic!r}, version {version})")
    if tag_len > 1024:
        raise ProtocolError(f"a session tag of {tag_len} bytes")
    tag = read(tag_len).decode("utf-8", "replace")
    index, offset, name_len = _HELLO_TAIL.unpack(read(_HELLO_TAIL.size))
    name = read(name_len).decode("utf-8", "replace")
    passing = ""
    if flags & PASSING:
        (length,) = _NAME.unpack(read(_NAME.size))
        passing = read(length).decode("utf-8", "replace")
    return Hello(tag, index, name, offset, passing)


def pack_answer(status: int, have: int, message: str = "") -> bytes:
    raw = message.encode()[:1000]
    return _ANSWER.pack(MAGIC, status, have, len(raw)) + raw


def read_answer(read: Callable[[int], bytes]) -> tuple[int, int, str]:
    """(status, the upstream's whole chunks, message)."""
    magic, status, have, length = _ANSWER.unpack(read(_ANSWER.size))
    if magic != MAGIC:
        raise ProtocolError(f"not a chain answer (magic {magic!r})")
    return status, have, read(length).decode("utf-8", "replace")


def clock_ms() -> int:
    """This node's monotonic clock in milliseconds, modulo 2**32, as frames carry it."""
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


def pack_frame(
    kind: int,
    chunk: int,
    offset: int = 0,
    data: bytes = b"",
    have: int = 0,
    lag: int = 0,
    sent: int | None = None,
) -> bytes:
    stamp = clock_ms() if sent is None else sent
    return FRAME.pack(kind, chunk, offset, len(data), have, lag, stamp) + data


def read_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a blocking socket; ConnectionError at the end of the stream."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the connection closed")
        got += k
    return bytes(buf)


def tune(sock: socket.socket) -> None:
    """Find a dead peer in seconds, not the kernel's minutes: keepalive probes after 2 s of
    quiet, and a send that no one acknowledges for 10 s fails. Buffers: see
    :data:`SOCKET_BUFFER` (set before connecting, or on the listening socket, for the
    receive side's window to scale to it)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(SILENCE * 1000))


def peer_closed(sock: socket.socket) -> bool:
    """Whether the downstream end has closed: it never sends anything after its hello, so
    a readable socket means its end of the stream (or a peer breaking the protocol)."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)
