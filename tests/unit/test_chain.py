"""The chain transport on localhost: framing, the window, the choice of upstream, and
whole chains of receivers (each on its own 127.0.0.x address, as each node has its own IP)
fed by a real head or by a window the test controls."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers import receiver_class
from corral.agent.receivers.base import Context, Job, Received
from corral.agent.receivers.chain.receiver import LAG_SECONDS, ChainReceiver
from corral.agent.receivers.chain.relay import Relay
from corral.agent.receivers.chain.upstream import ChainParams, LagWatch, Picker, Upstream
from corral.agent.receivers.chain.window import Window
from corral.agent.report import Client
from corral.agent.wire import chain as wire
from corral.agent.wire.chain import (
    BUSY,
    DATA,
    IDLE,
    OK,
    PASSED,
    SKIP,
    WRONG_SESSION,
    Gone,
    Hello,
    ProtocolError,
    pack_answer,
    pack_frame,
    pack_hello,
    read_answer,
    read_exact,
    read_hello,
    session_tag,
)
from corral.agent.wire.chain_sender import Sender, Slot, answer_hello
from corral.config import Settings
from corral.deploy import transports
from corral.deploy.transports.base import Member, NotReady
from corral.deploy.transports.chain import ChainError, ChainTransport, order
from corral.images.exports import Chunked
from tests.fakes import ChunkServer, KeptUnpacker, free_port, stream_plan, stream_version

TAG = session_tag(7, "img:1", "ab" * 32)


# --- framing -------------------------------------------------------------------------


def reader(data: bytes) -> Any:
    buf = bytearray(data)

    def read(n: int) -> bytes:
        if len(buf) < n:
            raise ConnectionError("short")
        out = bytes(buf[:n])
        del buf[:n]
        return out

    return read


def test_hello_answer_and_frames_round_trip() -> None:
    hello = read_hello(reader(pack_hello(TAG, 12, "tb003", 65536)))
    assert (hello.tag, hello.index, hello.name, hello.offset) == (TAG, 12, "tb003", 65536)
    assert read_answer(reader(pack_answer(WRONG_SESSION, 3, "no"))) == (WRONG_SESSION, 3, "no")
    frame = pack_frame(DATA, 4, 65536, b"xyz", have=4, lag=9, sent=2**32 - 1)
    assert len(frame) == wire.FRAME.size + 3
    assert wire.FRAME.unpack(frame[: wire.FRAME.size]) == (DATA, 4, 65536, 3, 4, 9, 2**32 - 1)
    stamped = wire.FRAME.unpack(pack_frame(IDLE, 0)[: wire.FRAME.size])[-1]
    assert abs(stamped - wire.clock_ms()) < 1000  # the sender's clock, by default


def test_a_hello_from_something_else_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not a chain hello"):
        read_hello(reader(b"GET / HTTP/1.1\r\n\r\n"))
    with pytest.raises(ProtocolError, match="not a chain answer"):
        read_answer(reader(b"HTTP/1.1 200 OK\r\n\r\n"))


def test_answer_hello_refuses_another_session_and_serves_ours() -> None:
    for tag, status in ((TAG, OK), ("8/img:1/" + "ab" * 32, WRONG_SESSION)):
        a, b = socket.socketpair()
        with a, b:
            b.sendall(pack_hello(tag, 5, "tb002"))
            hello = answer_hello(a, lambda t: 3 if t == TAG else None)
            got = read_answer(lambda n, b=b: read_exact(b, n))  # type: ignore[misc]
            assert got[0] == status
            assert (hello is not None) == (status == OK)
            if hello:
                assert hello.index == 5 and got[1] == 3


# --- the window ----------------------------------------------------------------------


def test_the_window_serves_pieces_before_the_chunk_is_whole_and_forgets_old_chunks() -> None:
    window = Window([10, 10, 10, 10], keep=2)
    assert window.read(0, 0, 4, timeout=0) is None
    window.extend(b"abcdef")
    assert window.read(0, 0, 4, timeout=0) == b"abcd"
    assert window.read(0, 4, 4, timeout=0) == b"ef"
    assert window.read(0, 6, 4, timeout=0) is None  # not arrived yet
    window.restart()  # a new upstream: the chunk starts again; same bytes will come
    assert window.read(0, 0, 4, timeout=0) is None
    for i in range(3):
        window.complete(i, bytes([i]) * 10)
    assert window.have == 3 and window.low == 1  # chunk 0 forgotten (keep=2)
    with pytest.raises(Gone) as gone:
        window.read(0, 0, 4, timeout=0)
    assert gone.value.low == 1
    assert window.read(2, 8, 4, timeout=0) == b"\x02\x02"
    with pytest.raises(ValueError):
        window.complete(1, b"")  # chunks come in order


def test_a_reader_waits_for_the_next_piece_and_wakes_on_close() -> None:
    window = Window([10], keep=2)
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(window.read(0, 0, 10, timeout=5)))
    t.start()
    time.sleep(0.05)
    window.extend(b"12345")
    t.join(2)
    assert got == [b"12345"]
    window.close()
    with pytest.raises(wire.Closed):
        window.read(0, 5, 5, timeout=5)


# --- choosing the upstream -----------------------------------------------------------


def test_the_window_holds_the_stream_for_the_node_after_it_within_a_budget() -> None:
    window = Window([10] * 8, keep=2, hold=1.0)
    needs = ["tb002", 0]
    window.successor = lambda: (str(needs[0]), int(needs[1]))

    def complete(i: int) -> threading.Thread:
        t = threading.Thread(target=window.complete, args=(i, bytes([i]) * 10))
        t.start()
        return t

    for i in range(2):
        complete(i).join(1)  # nothing forgotten yet
    assert window.held == 0
    t = complete(2)  # chunk 0 would be forgotten, and tb002 still needs it
    t.join(0.1)
    assert t.is_alive() and window.low == 0
    needs[1] = 1
    window.read(1, 0, 10, timeout=0)  # its sender moved on: that wakes the hold
    t.join(1)
    assert not t.is_alive() and window.low == 1 and 0.1 <= window.held < 1.0
    # tb002 stays at chunk 1: held for what is left of the budget, then forgotten
    complete(3).join(3)
    assert window.low == 2 and window.given_up == "tb002" and window.held >= 0.99
    started = time.monotonic()
    complete(4).join(1)  # not held for again...
    assert time.monotonic() - started < 0.2 and window.low == 3
    needs[1] = 4  # ...until it is back in the window (it took the gap from the server)
    complete(5).join(1)
    assert window.given_up is None


def test_without_a_successor_or_a_budget_the_window_never_waits() -> None:
    for window in (Window([1] * 4, keep=1, hold=5), Window([1] * 4, keep=1)):
        if window.hold:
            window.successor = lambda: None
        else:
            window.successor = lambda: ("tb002", 0)
        started = time.monotonic()
        for i in range(4):
            window.complete(i, b"x")
        assert time.monotonic() - started < 0.5 and window.low == 3


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chain_of(*names: str) -> list[Upstream]:
    ups = [Upstream(n, ("127.0.0.1", 1)) for n in names]
    return [*ups, Upstream("head", ("127.0.0.1", 2), head=True)]


def test_the_direct_predecessor_gets_time_to_start_then_is_bypassed() -> None:
    clock = Clock()
    picker = Picker(chain_of("tb003", "tb002", "tb001"), start_patience=30, grace=3, clock=clock)
    current = picker.current()
    assert current is not None and current.name == "tb003"
    assert not picker.failed()  # refused: not listening yet
    clock.now = 29
    assert not picker.failed()
    clock.now = 30.5
    assert picker.failed()
    current = picker.current()
    assert current is not None and current.name == "tb002"
    # a farther node does not start late: refused means dead or finished
    assert picker.failed()
    current = picker.current()
    assert current is not None and current.name == "tb001" and picker.switches == 2


def test_an_upstream_that_answered_then_dropped_gets_the_grace_only() -> None:
    clock = Clock()
    picker = Picker(chain_of("tb003", "tb002"), start_patience=30, grace=3, clock=clock)
    picker.answered()  # it took the connection (then died before a whole chunk came)
    clock.now = 100
    assert not picker.failed()
    clock.now = 102
    picker.succeeded()  # it came back and delivered: the clock starts over
    clock.now = 104
    assert not picker.failed()
    clock.now = 107.5
    assert picker.failed()
    current = picker.current()
    assert current is not None and current.name == "tb002"


def test_after_a_few_nodes_gone_in_a_row_the_head() -> None:
    picker = Picker(chain_of("tb006", "tb005", "tb004", "tb003", "tb002", "tb001"), max_walk=4)
    assert picker.failed(fatal=True)
    picker.answered()  # tb005 answers, then dies: the walk starts again from it
    assert picker.failed(fatal=True)
    for _ in range(3):
        assert picker.failed()
        current = picker.current()
        assert current is not None and not current.head
    assert picker.failed()  # a fourth in a row without an answer
    current = picker.current()
    assert current is not None and current.head


def test_a_refusal_passes_at_once_and_after_the_head_comes_http() -> None:
    clock = Clock()
    picker = Picker(chain_of("tb001"), clock=clock)
    assert picker.failed(fatal=True)  # wrong session or closing
    current = picker.current()
    assert current is not None and current.head
    assert picker.farther() is None  # a lagging head is never passed for... the head
    assert picker.failed(fatal=True)
    assert picker.current() is None  # one chunk over HTTP
    picker.after_http()
    current = picker.current()
    assert current is not None and current.head


def test_a_lagging_upstream_is_passed_for_the_node_before_it_then_the_head() -> None:
    picker = Picker(chain_of("tb003", "tb002"))
    farther = picker.farther()
    assert farther is not None and farther.name == "tb002"
    picker.pass_lagging()
    current = picker.current()
    assert current is not None and current.name == "tb002"
    assert picker.passing == "tb003"  # tb002 is told: it hands tb003's slot over
    farther = picker.farther()
    assert farther is not None and farther.head  # the head hands its slot over too
    picker.pass_lagging()
    current = picker.current()
    assert current is not None and current.head and picker.passing == "tb002"
    assert picker.farther() is None
    with pytest.raises(ValueError):
        Picker([Upstream("tb001", ("x", 1))])


def test_a_node_refused_as_a_second_successor_goes_to_the_tail_then_http() -> None:
    tail = Upstream("tb009", ("127.0.0.1", 1))
    picker = Picker(chain_of("tb003", "tb002"), tail=tail)
    picker.exile()  # tb003 feeds another node, or passed us
    current = picker.current()
    assert current is not None and current.name == "tb009" and picker.passing == ""
    assert picker.farther() is None  # nobody is passed for lag from the tail
    assert picker.failed(fatal=True)  # the tail is gone: never the head (it feeds tb001)
    assert picker.current() is None
    picker.after_http()
    assert picker.current() is None  # the rest over HTTP
    alone = Picker(chain_of("tb003"), tail=None)
    alone.exile()
    assert alone.current() is None
    # a node that still feeds a successor: the tail is behind it, HTTP at once
    feeding = Picker(chain_of("tb003", "tb002"), tail=tail)
    feeding.exile(feeding=True)
    assert feeding.current() is None and feeding.http_rest


def test_a_node_is_slow_when_its_lag_grows_in_seconds_not_when_it_started_late() -> None:
    clock = Clock()
    late = LagWatch(clock=clock)
    # 5 MiB behind an upstream that gets 256 KiB/s, keeping pace: no growth
    got = []
    for tick in range(40):
        clock.now = tick * 0.5
        got.append(late.growth(5120 + tick * 128, tick * 128))
    assert max(got) == 0
    slow = LagWatch(clock=clock)
    # it gets a tenth of what its upstream gets: 0.9 s behind for every second
    got = []
    for tick in range(40):
        clock.now = 100 + tick * 0.5
        got.append(slow.growth(tick * 128, tick * 128 // 10))
    assert got[:4] == [0, 0, 0, 0]  # no pace known before PACE_SPAN
    assert 16_000 <= got[-1] <= 19_500  # 19.5 s at 0.9 s a second
    fast = LagWatch(clock=clock)  # the same lag growth in KiB on a link 8 times faster
    got = []
    for tick in range(40):
        clock.now = 200 + tick * 0.5
        got.append(fast.growth(tick * 1024, tick * 1024 - min(tick, 8) * 115))
    assert got[-1] <= 1000  # 920 KiB at 2 MiB/s: under half a second, and not growing


def test_a_slow_node_is_judged_by_when_its_frames_were_sent_not_by_when_they_came() -> None:
    # An upstream gets 256 KiB/s; its successor's link takes 25.6 KiB/s. The 128 KiB the
    # sockets hold go out at once, at the upstream's pace, and then wait on the slow link:
    # each frame tells what the upstream held up to 5 s before it arrives.
    def first_judged(stamped: bool) -> float:
        clock = Clock()
        watch = LagWatch(clock=clock)
        for tick in range(1, 200):
            clock.now = tick * 0.25
            holds = 25.6 * clock.now
            sent = (holds - 128) / 25.6 if holds > 128 else holds / 256
            stamp = int((sent + 5000) * 1000) & 0xFFFFFFFF  # another clock than ours
            lag_ms = watch.growth(int(256 * sent) + 16, int(holds), stamp if stamped else None)
            if lag_ms >= LAG_SECONDS * 1000:
                return clock.now
        return math.inf

    # 0.9 s behind for every second: 8 s after 8.9 s
    assert first_judged(stamped=True) <= 10
    assert first_judged(stamped=False) >= 14  # by the frames' arrival: the old news of `have`


def test_a_lag_far_in_the_past_is_forgotten() -> None:
    clock = Clock()
    watch = LagWatch(window=30, clock=clock)
    for tick in range(200):
        clock.now = tick * 0.5
        stalled = 5 <= tick < 15  # 5 s without a byte, then the same pace again
        holds = tick * 128 - (1280 if tick >= 15 else (tick - 5) * 128 if stalled else 0)
        lag_ms = watch.growth(tick * 128, holds)
    assert lag_ms == 0  # 100 s later: the 5 s stall is outside the window


def test_params_give_the_upstreams_nearest_first_without_addressless_nodes() -> None:
    params = ChainParams.from_dict(
        {
            "session": TAG,
            "position": 3,
            "members": [
                ["tb001", "10.0.0.2"],
                ["tb002", None],
                ["tb003", "10.0.0.4"],
                ["tb004", "10.0.0.5"],
                ["tb005", "10.0.0.6"],
            ],
            "relay_port": 7731,
            "head": ["10.0.0.1", 7730],
            "base": "http://10.0.0.1:8080/images/img/1",
        }
    )
    assert params.me == ("tb004", "10.0.0.5") and not params.is_last
    assert [(u.name, u.address, u.head) for u in params.upstreams()] == [
        ("tb003", ("10.0.0.4", 7731), False),
        ("tb001", ("10.0.0.2", 7731), False),
        ("head", ("10.0.0.1", 7730), True),
    ]
    with pytest.raises(ReceiveError, match="bad parameters"):
        ChainParams.from_dict({"session": TAG})
    with pytest.raises(ReceiveError, match="position 9"):
        ChainParams.from_dict({**params.__dict__, "position": 9, "head": ["h", 1]})


# --- a sender on a socket pair -------------------------------------------------------


def frames(sock: socket.socket, n: int) -> list[tuple[int, int, int, bytes]]:
    out = []
    for _ in range(n):
        kind, chunk, offset, length, _have, _front, _sent = wire.FRAME.unpack(
            read_exact(sock, wire.FRAME.size)
        )
        out.append((kind, chunk, offset, read_exact(sock, length) if length else b""))
    return out


def data_frames(sock: socket.socket, nbytes: int) -> list[tuple[int, int, int, bytes]]:
    """DATA frames (heartbeats left out) until ``nbytes`` of payload came."""
    out: list[tuple[int, int, int, bytes]] = []
    while sum(len(f[3]) for f in out) < nbytes:
        out += [f for f in frames(sock, 1) if f[0] == DATA]
    return out


def test_a_sender_skips_what_its_window_forgot_and_knows_when_the_downstream_has_all() -> None:
    sizes = [100_000, 10, 10]
    window = Window(sizes, keep=2)
    chunks = [os.urandom(100_000), b"b" * 10, b"c" * 10]
    for i, data in enumerate(chunks):
        window.complete(i, data)
    a, b = socket.socketpair()
    sender = Sender(a, window, sizes, 0, "test", heartbeat=0.05, wait_close=5)
    t = threading.Thread(target=sender.run)
    t.start()
    with b:
        got = frames(b, 3)
        assert got[0] == (SKIP, 1, 0, b"")  # chunk 0 is gone: fetch it over HTTP
        assert got[1:] == [(DATA, 1, 0, b"b" * 10), (DATA, 2, 0, b"c" * 10)]
    t.join(5)
    assert sender.complete and sender.sent == 20 and sender.skips == 1


def test_a_sender_cuts_chunks_in_pieces_and_sends_heartbeats_while_waiting() -> None:
    sizes = [150_000, 5]
    window = Window(sizes)
    data = os.urandom(150_000)
    a, b = socket.socketpair()
    sender = Sender(a, window, sizes, 0, "test", heartbeat=0.05, wait_close=5)
    t = threading.Thread(target=sender.run)
    t.start()
    with b:
        assert frames(b, 1)[0][0] == IDLE  # nothing yet
        window.extend(data[:100_000])  # forwarded before the chunk is whole
        pieces = data_frames(b, 100_000)
        assert [(f[2], len(f[3])) for f in pieces] == [(0, 65536), (65536, 100_000 - 65536)]
        # (a sender that finds more than a frame's worth sends it in frames of 64 KiB)
        window.complete(0, data)
        window.complete(1, b"12345")
        rest = data_frames(b, 50_005)
        assert b"".join(f[3] for f in pieces + rest) == data + b"12345"
    t.join(5)
    assert sender.complete


def test_when_a_relay_holding_everything_may_stop_serving() -> None:
    window = Window([1])
    relay = Relay(("127.0.0.1", 0), TAG, window)
    a, b = socket.socketpair()
    try:
        assert relay.drained(is_last=True, idle=10)  # nobody comes after the last
        assert not relay.drained(is_last=False, idle=10)  # the next may still come
        relay.last_event -= 11
        assert relay.drained(is_last=False, idle=10)  # it did not, for `idle` seconds
        sender = Sender(a, window, [1], 0, "tb002")
        relay.senders.append(sender)
        assert not relay.drained(is_last=True, idle=10)  # being served
        sender.last_progress -= 11
        assert relay.drained(is_last=True, idle=10)  # took nothing for `idle`: not waited for
        sender.done.set()
        sender.last_progress = time.monotonic()
        assert not relay.drained(is_last=False, idle=10)  # it left without everything
        sender.complete = True
        assert relay.drained(is_last=False, idle=10)  # it has everything
    finally:
        a.close()
        b.close()
        relay.close()


# --- whole chains on localhost ---------------------------------------------------------


class FastChain(ChainReceiver):
    heartbeat = 0.1
    silence = 3.0
    start_patience = 3.0
    grace = 0.5
    drain_idle = 3.0
    linger = 2.0


class SteadyChain(FastChain):
    """No passing for lag: on loopback the first node can be chunks ahead for a moment."""

    lag_seconds = 1e9


class KeenChain(FastChain):
    """Sees a slow node at test sizes (the image is under a megabyte)."""

    lag_seconds = 0.1
    lag_span = 0.2


class RoomyChain(FastChain):
    """Keeps the whole (small) image: what comes late is never sent over HTTP."""

    window_chunks = 64


class RoomySteadyChain(RoomyChain, SteadyChain):
    pass


def chain_plan(chunks: list[bytes], params: dict[str, Any], node: str) -> Plan:
    return stream_plan(chunks, "chain", params, node=node)


@dataclass
class Node:
    name: str
    plan: Plan
    receiver: ChainReceiver
    unpacker: KeptUnpacker
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Received | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            try:
                self.result = self.receiver.receive(
                    Job(self.plan, Path("/nonexistent"), lambda d, t: None, self.cancel)
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 30) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.name} still receiving"


def nodes_for(
    chunks: list[bytes],
    head: tuple[str, int],
    count: int,
    server: ChunkServer,
    *,
    tag: str = TAG,
    delays: dict[int, float] | None = None,
    cls: type[ChainReceiver] = FastChain,
) -> list[Node]:
    port = free_port()
    members = [[f"tb{i + 1:03d}", f"127.0.0.{i + 2}"] for i in range(count)]
    out = []
    for i in range(count):
        params = {
            "session": tag,
            "position": i,
            "members": members,
            "relay_port": port,
            "head": list(head),
            "base": "http://127.0.0.1:1/images/img/1",
        }
        unpacker = KeptUnpacker((delays or {}).get(i, 0.0))
        receiver = cls(Context(cast(Client, server), tries=2))
        receiver.make_unpacker = unpacker  # type: ignore[method-assign]
        out.append(
            Node(members[i][0], chain_plan(chunks, params, members[i][0]), receiver, unpacker)
        )
    return out


@pytest.fixture
def test_head() -> Iterator[tuple[Relay, Window]]:
    """A head whose window the test fills chunk by chunk."""
    window: Window | None = None
    relay: Relay | None = None

    def make(sizes: list[int], keep: int = 64) -> tuple[Relay, Window]:
        nonlocal window, relay
        window = Window(sizes, keep)
        relay = Relay(("127.0.0.1", 0), TAG, window, heartbeat=0.1)
        relay.start()
        return relay, window

    yield make  # type: ignore[misc]
    if relay is not None:
        relay.close()


def wait_for(check: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def head_address(relay: Relay) -> tuple[str, int]:
    assert relay.sock is not None
    host, port = relay.sock.getsockname()
    return host, port


def test_three_nodes_in_a_chain_each_forward_to_the_next(test_head: Any) -> None:
    chunks = [os.urandom(150_000) for _ in range(6)] + [os.urandom(1234)]
    relay, window = test_head([len(c) for c in chunks])
    server = ChunkServer(chunks)
    nodes = nodes_for(chunks, head_address(relay), 3, server, cls=SteadyChain)
    for node in nodes:
        node.start()
    for i, data in enumerate(chunks):
        window.complete(i, data)
    for node in nodes:
        node.join()
    whole = b"".join(chunks)
    for node in nodes:
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert node.unpacker.data == whole and node.unpacker.finished
        assert node.result is not None
        assert node.result.details["from_relay"] == len(chunks)
        assert node.result.details["from_http"] == 0
    # each served the next one the whole stream; the last served nobody
    served = [n.result.details["served_bytes"] for n in nodes if n.result]
    assert served == [len(whole), len(whole), 0]
    assert relay.served == len(whole)  # the head sent it once
    assert server.gets == []


def test_a_node_dying_mid_stream_is_bypassed_and_its_successor_resumes(test_head: Any) -> None:
    chunks = [os.urandom(100_000) for _ in range(8)]
    relay, window = test_head([len(c) for c in chunks])
    server = ChunkServer(chunks)
    nodes = nodes_for(chunks, head_address(relay), 3, server, cls=SteadyChain)
    for node in nodes:
        node.start()
    for i in range(3):
        window.complete(i, chunks[i])
    # wait until the last node has the three chunks, then the middle one dies
    wait_for(lambda: len(nodes[2].unpacker.data) == 300_000, "tb003 to have 3 chunks")
    nodes[1].cancel.set()
    nodes[1].join()
    assert isinstance(nodes[1].error, Cancelled)
    for i in range(3, len(chunks)):
        window.complete(i, chunks[i])
    for node in (nodes[0], nodes[2]):
        node.join()
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert node.unpacker.data == b"".join(chunks)
    last = nodes[2].result
    assert last is not None
    assert last.details["switches"] == 1  # tb002 passed, tb001 took over
    assert last.details["from_http"] == 0  # tb001 still held what tb003 needed
    assert server.gets == []


def test_a_slow_node_is_passed_by_the_node_after_it(
    test_head: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # small buffers, as a 4 MiB chunk is to 256 KiB ones: the lag is not hidden in them
    monkeypatch.setattr(wire, "SOCKET_BUFFER", 4096)
    chunks = [os.urandom(50_000) for _ in range(16)]
    relay, window = test_head([len(c) for c in chunks])
    server = ChunkServer(chunks)
    # tb002 unpacks slowly: it falls behind tb001, and tb003 pulls from tb001 instead
    nodes = nodes_for(chunks, head_address(relay), 3, server, delays={1: 0.2}, cls=KeenChain)
    for node in nodes:
        node.start()
    for i, data in enumerate(chunks):
        window.complete(i, data)
    for node in nodes:
        node.join()
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert node.unpacker.data == b"".join(chunks)
    last = nodes[2].result
    assert last is not None and last.details["lag_passes"] == 1
    # each says how far it fell behind: tb002 past the threshold, tb001 not at all
    slow, first = nodes[1].result, nodes[0].result
    assert slow is not None and slow.details["most_lag_ms"] >= KeenChain.lag_seconds * 1000
    assert first is not None and first.details["most_lag_ms"] == 0
    assert nodes[2].receiver.picker is not None
    current = nodes[2].receiver.picker.current()
    assert current is not None and current.name == "tb001"
    # tb001 handed tb002's slot to tb003, one after the other, never both at once; tb002
    # finished from the tail, or from the head once tb001 had left
    assert served_peers(nodes[0]) == ["tb002", "tb003"]
    for upstream in (relay, *(n.receiver.relay for n in nodes)):
        assert upstream is not None and not overlapping(upstream), [
            (s.peer, s.started, s.ended) for s in upstream.senders
        ]


class SlowLinkChain(KeenChain):
    """A node whose link is slow for its first 500 kB: it reads them at 100 kB/s."""

    slow_bytes = 500_000

    def _read(self, sock: socket.socket, n: int, cancel: threading.Event) -> bytes:
        if self.slow_bytes > 0:
            self.slow_bytes -= n
            time.sleep(n / 100_000)
        return super()._read(sock, n, cancel)


def test_a_slow_node_cut_off_by_its_upstream_does_not_pass_it(
    test_head: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tb003 is on a slow link and up before tb002 (it waits for it: start patience).
    tb004 passes tb003 before tb003 has a whole chunk, and tb002 hands tb003's slot to
    tb004 and cuts tb003 off. tb003 got bytes from tb002, so the drop is a new failure:
    it asks tb002 again, is refused as passed, and takes the rest from the tail. Before,
    its failures while tb002 was not up yet still counted, it passed tb002 at once, and
    tb001 handed it tb002's slot: tb002, which fed tb004, pulled from the tail tb004, and
    the two waited for each other for good (bench/deploy.py at N = 100, tb050 at B/10:
    51 nodes never finished)."""
    monkeypatch.setattr(wire, "SOCKET_BUFFER", 4096)
    chunks = [os.urandom(400_000) for _ in range(4)]
    relay, window = test_head([len(c) for c in chunks])
    server = ChunkServer(chunks)
    nodes = nodes_for(chunks, head_address(relay), 4, server, cls=KeenChain)
    tb001, tb002, tb003, tb004 = nodes
    slow = SlowLinkChain(Context(cast(Client, server), tries=2))
    slow.make_unpacker = tb003.unpacker  # type: ignore[method-assign]
    tb003.receiver = slow
    for node in (tb001, tb003, tb004):
        node.start()
    time.sleep(1.0)  # tb003 cannot reach tb002 yet, and waits for it
    tb002.start()
    for i, data in enumerate(chunks):  # four times the pace tb003 can keep
        window.complete(i, data)
        time.sleep(1.0)
    for node in nodes:
        node.join()
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert node.unpacker.data == b"".join(chunks)
    assert tb004.result is not None and tb004.result.details["lag_passes"] >= 1
    assert tb003.result is not None and tb003.result.details["exiled"] == 1
    assert served_peers(tb001)[0] == "tb002"
    for upstream in (relay, *(n.receiver.relay for n in nodes)):
        assert upstream is not None and not overlapping(upstream)


def served_peers(node: Node) -> list[str]:
    relay = node.receiver.relay
    assert relay is not None
    return [s.peer.split()[0] for s in relay.senders]


def overlapping(relay: Relay) -> bool:
    """Whether a relay ever served two nodes at once (its senders' lives). A connection
    handed over is shut down before the next is served; its thread notices within a
    frame, so an end up to 0.1 s after the next start is that, not two at once."""
    lives = sorted((s.started, s.ended or time.monotonic(), s.peer) for s in relay.senders)
    names = [p.split()[0] for _, _, p in lives]
    return any(
        b[0] < a[1] - 0.1 and names[i] != names[i + 1]
        for i, (a, b) in enumerate(itertools.pairwise(lives))
    )


def test_a_node_up_before_its_predecessor_never_makes_an_uplink_feed_two(
    test_head: Any,
) -> None:
    """tb003 is up before tb002: it passes tb002 for tb001 (start patience). When tb002
    comes, tb001 already feeds tb003: tb002 is refused, and pulls from the tail. Before,
    tb001 fed both, and every node after them went at half the rate."""
    chunks = [os.urandom(100_000) for _ in range(8)]
    relay, window = test_head([len(c) for c in chunks])
    server = ChunkServer(chunks)
    nodes = nodes_for(chunks, head_address(relay), 4, server, cls=RoomySteadyChain)
    tb001, tb002, tb003, tb004 = nodes
    for node in (tb001, tb003, tb004):
        node.start()
    window.complete(0, chunks[0])
    wait_for(lambda: len(tb004.unpacker.data) == 100_000, "tb004 to have chunk 0 via tb003")
    tb002.start()
    # the rest only once tb002 pulls from the tail: on a busy host the tail could be done
    # and gone before tb002 came to it, and tb002 would rightly go elsewhere
    wait_for(lambda: served_peers(tb004) == ["tb002"], "tb002 to pull from the tail, tb004")
    for i in range(1, len(chunks)):
        window.complete(i, chunks[i])
    for node in nodes:
        node.join()
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert node.unpacker.data == b"".join(chunks)
    assert served_peers(tb001) == ["tb003"]
    assert served_peers(tb003) == ["tb004"]
    assert served_peers(tb004) == ["tb002"]  # the tail, whose uplink fed nobody
    assert tb002.result is not None and tb002.result.details["exiled"] == 1
    assert relay.served == len(b"".join(chunks)) and server.gets == []


class TightChain(SteadyChain):
    """Keeps two chunks: on loopback, the stream outruns a node that starts late."""

    window_chunks = 2


class TightChainNoHold(TightChain):
    hold_seconds = 0.0


@pytest.mark.parametrize("cls", [TightChain, TightChainNoHold])
def test_a_relay_holds_the_stream_for_a_successor_that_starts_late(
    test_head: Any, cls: type[ChainReceiver]
) -> None:
    chunks = [os.urandom(50_000) for _ in range(8)]
    relay, window = test_head([len(c) for c in chunks])
    for i, data in enumerate(chunks):
        window.complete(i, data)  # the head has it all (a server's chunk files)
    server = ChunkServer(chunks)
    nodes = nodes_for(chunks, head_address(relay), 3, server, cls=cls)
    for node in nodes:
        node.start()
        time.sleep(0.5)  # each starts half a second after the one before it
    for node in nodes:
        node.join()
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert node.unpacker.data == b"".join(chunks)
    details = [n.result.details for n in nodes if n.result]
    if cls.hold_seconds:
        # tb001 and tb002 waited for the next one; nothing came from the server
        assert server.gets == [] and relay.served == len(b"".join(chunks))
        assert [d["held_ms"] > 0 for d in details] == [True, True, False]
    else:
        # without the hold, what a relay forgot before its successor came: over HTTP
        assert server.gets and sum(d["skips"] for d in details) >= 1


def test_a_node_goes_on_while_it_still_serves_a_slow_successor(test_head: Any) -> None:
    chunks = [os.urandom(20_000) for _ in range(12)]
    relay, window = test_head([len(c) for c in chunks])
    for i, data in enumerate(chunks):
        window.complete(i, data)
    server = ChunkServer(chunks)
    first, slow = nodes_for(chunks, head_address(relay), 2, server, delays={1: 0.4}, cls=RoomyChain)
    first.start()
    slow.start()
    first.join()  # after its linger (2 s), with tb002 still taking 12 x 0.4 s
    assert first.error is None and slow.thread is not None and slow.thread.is_alive()
    slow.join()
    assert slow.error is None, repr(slow.error)
    assert slow.unpacker.data == b"".join(chunks)
    assert server.gets == [] and relay.served == len(b"".join(chunks))  # tb001 served on


class Breaks(KeptUnpacker):
    def write(self, data: bytes) -> None:
        if self.data:
            raise ReceiveError("unpacking stopped: tar exited with 2: disk full")
        super().write(data)


def test_an_unpacking_failure_ends_the_receive_with_its_reason(test_head: Any) -> None:
    chunks = [os.urandom(20_000) for _ in range(5)]
    relay, window = test_head([len(c) for c in chunks])
    for i, data in enumerate(chunks):
        window.complete(i, data)
    (node,) = nodes_for(chunks, head_address(relay), 1, ChunkServer(chunks))
    node.unpacker = Breaks()
    node.receiver.make_unpacker = node.unpacker  # type: ignore[method-assign]
    node.start()
    node.join()
    assert isinstance(node.error, ReceiveError) and "disk full" in str(node.error)
    assert node.unpacker.aborted and not node.unpacker.finished


def test_what_the_window_lost_comes_over_http(test_head: Any) -> None:
    chunks = [os.urandom(20_000) for _ in range(6)]
    relay, window = test_head([len(c) for c in chunks], keep=2)
    for i, data in enumerate(chunks[:4]):
        window.complete(i, data)  # the head moved on before the node came: 0 and 1 are gone
    server = ChunkServer(chunks)
    (node,) = nodes_for(chunks, head_address(relay), 1, server)
    node.start()
    wait_for(lambda: len(node.unpacker.data) == 80_000, "the node to have chunks 0-3")
    for i in (4, 5):
        window.complete(i, chunks[i])
    node.join()
    assert node.error is None, repr(node.error)
    assert node.unpacker.data == b"".join(chunks)
    assert server.gets == [0, 1]
    assert node.result is not None and node.result.details["skips"] == 1


def test_a_corrupt_chunk_is_asked_again_then_fetched_over_http(test_head: Any) -> None:
    chunks = [os.urandom(20_000) for _ in range(3)]
    relay, window = test_head([len(c) for c in chunks])
    window.complete(0, chunks[0])
    window.complete(1, b"x" + chunks[1][1:])  # this upstream holds it wrong
    window.complete(2, chunks[2])
    server = ChunkServer(chunks)
    (node,) = nodes_for(chunks, head_address(relay), 1, server)
    node.start()
    node.join()
    assert node.error is None, repr(node.error)
    assert node.unpacker.data == b"".join(chunks)
    assert node.result is not None
    assert node.result.details["bad"] == 2  # asked twice (tries=2), then over HTTP
    assert server.gets[0] == 1


def test_a_head_of_another_session_is_never_taken_from(test_head: Any) -> None:
    chunks = [os.urandom(1000) for _ in range(3)]
    relay, window = test_head([len(c) for c in chunks])
    for i, data in enumerate(chunks):
        window.complete(i, b"wrong" + data[5:])  # another image altogether
    server = ChunkServer(chunks)
    other = session_tag(8, "img:1", "ab" * 32)
    (node,) = nodes_for(chunks, head_address(relay), 1, server, tag=other)
    node.start()
    node.join()
    assert node.error is None, repr(node.error)
    assert node.unpacker.data == b"".join(chunks)
    assert server.gets == [0, 1, 2] and relay.served == 0


# --- the server side -------------------------------------------------------------------


@pytest.fixture
def transport(tmp_path: Path) -> Iterator[ChainTransport]:
    settings = Settings(home=tmp_path, server_url="http://127.0.0.1:8080", address="127.0.0.1")
    chain = ChainTransport(settings, head_port=0)
    yield chain
    chain.close()


def test_the_transport_is_registered_on_both_sides() -> None:
    assert transports.REGISTRY["chain"] is ChainTransport
    assert receiver_class("chain") is ChainReceiver


def test_a_chain_forms_from_the_nodes_there_in_name_order_once_all_have_asked(
    transport: ChainTransport, tmp_path: Path
) -> None:
    chunks = [b"a" * 100, b"b" * 50]
    version = stream_version(tmp_path / "v1", chunks)
    with pytest.raises(ChainError, match="no chain session"):
        transport.params(Chunked(version), "tb002")
    members = [Member("tb003", "10.0.0.4"), Member("tb001", "10.0.0.2"), Member("tb002", None)]
    transport.start(7, Chunked(version), members)
    # they come up in another order than their names; the chain waits for all three
    for node in ("tb003", "tb002"):
        with pytest.raises(NotReady, match="of 3 nodes there"):
            transport.params(Chunked(version), node)
    first = transport.params(Chunked(version), "tb001")
    params = transport.params(Chunked(version), "tb002")
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert params == {
        "session": f"7/img:1/{sha}",
        "position": 1,
        "members": [["tb001", "10.0.0.2"], ["tb002", None], ["tb003", "10.0.0.4"]],
        "relay_port": wire.RELAY_PORT,
        "head": ["127.0.0.1", transport.head_port],
        "base": "http://127.0.0.1:8080/images/img/1",
    }
    assert first["position"] == 0 and transport.head_port != 0
    # started again (the manager's next pass): the chain it formed stands
    transport.start(7, Chunked(version), [Member("tb003", "10.0.0.4"), Member("tb002", None)])
    again = transport.params(Chunked(version), "tb003")
    assert again["position"] == 2 and again["session"] == params["session"]
    transport.finish(7, version)
    with pytest.raises(ChainError):
        transport.params(Chunked(version), "tb003")


def test_a_chain_waits_its_max_wait_then_late_nodes_go_at_the_tail(tmp_path: Path) -> None:
    clock = Clock()
    settings = Settings(
        home=tmp_path, server_url="http://127.0.0.1:8080", address="127.0.0.1", chain_max_wait=60
    )
    chain = ChainTransport(settings, head_port=0, clock=clock)
    try:
        version = stream_version(tmp_path / "v1", [b"a" * 100])
        names = ["tb001", "tb002", "tb003", "tb004"]
        chain.start(7, Chunked(version), [Member(n, f"10.0.0.{i}") for i, n in enumerate(names)])
        with pytest.raises(NotReady):
            chain.params(Chunked(version), "tb004")
        clock.now = 30
        with pytest.raises(NotReady):
            chain.params(Chunked(version), "tb002")
        clock.now = 60  # tb001 and tb003 never came: the chain starts with those there
        params = chain.params(Chunked(version), "tb004")
        assert [m[0] for m in params["members"]] == ["tb002", "tb004"]
        assert params["position"] == 1
        clock.now = 90  # tb003 comes late: at the tail, behind tb004
        late = chain.params(Chunked(version), "tb003")
        assert [m[0] for m in late["members"]] == ["tb002", "tb004", "tb003"]
        assert late["position"] == 2
        # the earlier nodes' places do not move
        assert chain.params(Chunked(version), "tb004")["position"] == 1
    finally:
        chain.close()


def test_an_uplink_feeds_one_successor_and_hands_it_over_to_whoever_passed_it() -> None:
    slot = Slot()

    class Fed:
        def __init__(self) -> None:
            self.done = threading.Event()
            self.sock = socket.socket()

    def hello(name: str, passing: str = "") -> Hello:
        return Hello(TAG, 0, name, 0, passing)

    assert slot.claim(hello("tb002")) is None
    fed = Fed()
    slot.attach("tb002", cast(Sender, fed))
    # a second successor is refused: the uplink would feed two
    refusal = slot.claim(hello("tb004"))
    assert refusal is not None and refusal[0] == BUSY and "tb002" in refusal[1]
    # passing someone else is no reason either
    refusal = slot.claim(hello("tb004", passing="tb003"))
    assert refusal is not None and refusal[0] == BUSY
    # tb002 reconnecting (a blip) takes its place back
    assert slot.claim(hello("tb002")) is None
    slot.attach("tb002", cast(Sender, fed))
    # tb003 passed tb002 (silent or slow): the slot is handed over, tb002 stays out
    assert slot.claim(hello("tb003", passing="tb002")) is None
    assert slot.holder() == "tb003"
    refusal = slot.claim(hello("tb002"))
    assert refusal is not None and refusal[0] == PASSED
    fed.sock.close()
    # once the one fed has ended (it has everything), the next may come
    other = Fed()
    slot.attach("tb003", cast(Sender, other))
    other.done.set()
    assert slot.claim(hello("tb009")) is None
    other.sock.close()


def test_the_slot_says_what_the_node_after_this_one_needs() -> None:
    slot = Slot()
    after = {"tb003", "tb004"}
    assert slot.needs(after, expected=True) == ("", 0)  # it has not come yet
    assert slot.needs(after, expected=False) is None  # the chain's last node
    assert slot.claim(Hello(TAG, 2, "tb003", 0)) is None
    assert slot.needs(after, expected=True) == ("tb003", 2)  # its hello's chunk
    a, b = socket.socketpair()
    with a, b:
        sender = Sender(a, Window([1] * 6), [1] * 6, 2, "tb003")
        sender.at = 4
        slot.attach("tb003", sender)
        assert slot.needs(after, expected=True) == ("tb003", 4)
        sender.done.set()
        assert slot.needs(after, expected=True) is None  # it has everything and left
    # a node before this one, pulling from the tail, is not held for
    tail = Slot()
    assert tail.claim(Hello(TAG, 0, "tb001", 0)) is None
    assert tail.needs(after, expected=False) is None


def test_order_is_by_name_and_drops_duplicates() -> None:
    got = order([Member("b", "1"), Member("a", "2"), Member("b", "1")])
    assert [m.node for m in got] == ["a", "b"]


def test_order_runs_through_each_rack_once() -> None:
    # racks interleaved by name (a node moved between racks, or names by slot), and two
    # nodes in no rack: each rack's nodes come together, so the stream enters it once
    racks = {"n1": "r2", "n2": "r1", "n3": "r2", "n4": None, "n5": "r1", "n6": None}
    got = order([Member(n, None, r) for n, r in reversed(racks.items())])
    assert [m.node for m in got] == ["n1", "n3", "n2", "n5", "n4", "n6"]
    crossings = sum(1 for a, b in itertools.pairwise(got) if a.rack != b.rack)
    assert crossings == len(set(racks.values())) - 1


def test_the_head_streams_the_chunk_files_of_its_session_only(
    transport: ChainTransport, tmp_path: Path
) -> None:
    chunks = [os.urandom(70_000), os.urandom(10)]
    version = stream_version(tmp_path / "v1", chunks)
    transport.start(7, Chunked(version), [Member("tb001", "127.0.0.2")])
    tag = transport.params(Chunked(version), "tb001")["session"]
    address = ("127.0.0.1", transport.head_port)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(pack_hello("7/img:1/" + "00" * 32, 0, "tb001"))
        status, _, _ = read_answer(lambda n: read_exact(sock, n))
        assert status == WRONG_SESSION
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(pack_hello(tag, 0, "tb001"))
        assert read_answer(lambda n: read_exact(sock, n)) == (OK, 2, "")
        got = frames(sock, 3)
        assert [(f[0], f[1], f[2]) for f in got] == [(DATA, 0, 0), (DATA, 0, 65536), (DATA, 1, 0)]
        assert b"".join(f[3] for f in got) == b"".join(chunks)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(pack_hello(tag, 1, "tb001"))  # resume at chunk 1
        assert read_answer(lambda n: read_exact(sock, n))[0] == OK
        assert frames(sock, 1) == [(DATA, 1, 0, chunks[1])]
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(pack_hello(tag, 0, "tb001", 69_990))  # inside chunk 0
        assert read_answer(lambda n: read_exact(sock, n))[0] == OK
        assert frames(sock, 2) == [(DATA, 0, 69_990, chunks[0][69_990:]), (DATA, 1, 0, chunks[1])]
    # what the head sent, for /metrics: each connection's frames, once they ended
    deadline = time.monotonic() + 10
    while transport.sent() != {version.ref: 70_010 + 10 + 20} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert transport.sent() == {version.ref: 70_010 + 10 + 20}


def test_a_real_head_and_real_unpacking_through_three_nodes(
    transport: ChainTransport, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    (tree / "usr" / "blob").write_bytes(os.urandom(300_000))
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("x\n")
    stream = subprocess.run(
        ["sh", "-c", f"tar -C {tree} -cf - . | zstd -q -c"], check=True, capture_output=True
    ).stdout
    chunks = [stream[i : i + 100_000] for i in range(0, len(stream), 100_000)]
    version = stream_version(tmp_path / "v1", chunks)
    members = [Member(f"tb{i:03d}", f"127.0.0.{i + 1}") for i in (1, 2, 3)]
    transport.start(7, Chunked(version), members)
    for member in members[:2]:
        with pytest.raises(NotReady):
            transport.params(Chunked(version), member.node)
    port = free_port()
    out = []
    threads = []
    for member in reversed(members):  # tb003's request forms it; the others ask again
        params = transport.params(Chunked(version), member.node) | {"relay_port": port}
        plan = chain_plan(chunks, params, member.node)
        target = tmp_path / member.node
        target.mkdir()
        out.append(target)
        receiver = FastChain(Context(None))
        threads.append(
            threading.Thread(
                target=receiver.receive,
                args=(Job(plan, target, lambda d, t: None, threading.Event()),),
            )
        )
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    for target in out:
        assert (target / "usr" / "blob").read_bytes() == (tree / "usr" / "blob").read_bytes()
        assert (target / "etc" / "hostname").read_text() == "x\n"
