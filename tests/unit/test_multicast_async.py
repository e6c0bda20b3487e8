"""The multicast receiver in async mode: a damaged chunk is fetched alone by HTTP while the
stream goes on, the chunks are unpacked in order, a node that loses chunk after chunk
leaves; with a stand-in for udp-receiver. Real udpcast runs in
tests/integration/test_deploy_multicast.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from corral.agent.errors import Cancelled
from corral.agent.plan import Plan
from corral.agent.receivers.base import Context, Job
from corral.agent.receivers.multicast import MulticastReceiver, Session, receiver_argv
from corral.agent.receivers.multicast_async import ReceiverStderr, Spool, spool_limit
from corral.agent.receivers.stream import Unpacker
from corral.agent.report import Client
from tests.fakes import UDP_RECEIVER, ChunkServer, KeptUnpacker, stream_plan


def plan_for(chunks: list[bytes], mode: str = "async", **kw: Any) -> Plan:
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    session: dict[str, Any] = {
        "tag": f"12/img:3/{sha}",
        "rdv": "239.194.0.1",
        "portbase": 24002,
        "interface": "10.0.0.2",
        "mode": mode,
        "max_bitrate": 19_000_000,
        "max_wait": 1.0,
        "leave_below": 0.25,
        "leave_window": 5.0,
        **kw,
    }
    params = {"base": "http://s/images/img/3", "session": session}
    return stream_plan(chunks, "multicast", params, deployment=12, ref="img:3")


def damaged(chunk: bytes) -> bytes:
    """The chunk as udp-receiver writes it after a slice FEC could not rebuild: the same
    length, one block of zeros."""
    return chunk[:5000] + bytes(1456) + chunk[5000 + 1456 :]


class Stand(MulticastReceiver):
    """The receiver with udp-receiver's stand-in and a kept unpacker."""

    def __init__(self, context: Context, argv: list[str], unpacker: KeptUnpacker) -> None:
        super().__init__(context)
        self.fake_argv = argv
        self.unpacker = unpacker
        self.spawned: list[list[str]] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        self.spawned.append(argv)
        return subprocess.Popen(self.fake_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def make_unpacker(self, target_dir: Path) -> Unpacker:
        return cast(Unpacker, self.unpacker)

    def make_room(self, wanted: int) -> None:
        pass

    def local_address(self, session: Session) -> str:
        return "10.0.0.2"


def receive(
    tmp: Path,
    chunks: list[bytes],
    sent: bytes,
    *,
    code: int = 0,
    sleep: float = 0.0,
    hold: tuple[int, Path] | None = None,
    server: ChunkServer | None = None,
    unpacker: KeptUnpacker | None = None,
    **attrs: Any,
) -> tuple[Stand, ChunkServer, KeptUnpacker]:
    """Receive ``chunks`` in async mode while udp-receiver's stand-in writes ``sent``
    (waiting after ``hold[0]`` bytes until the file ``hold[1]`` exists)."""
    script = tmp / "fake_udp_receiver.py"
    script.write_text(UDP_RECEIVER)
    data = tmp / "sent.bin"
    data.write_bytes(sent)
    argv = [sys.executable, str(script), str(data), str(code), "yes", str(sleep)]
    if hold is not None:
        argv += [str(hold[0]), str(hold[1])]
    server = server or ChunkServer(chunks)
    unpacker = unpacker or KeptUnpacker()
    receiver = Stand(Context(cast(Client, server), tries=2, poll=0.02), argv, unpacker)
    for name, value in attrs.items():
        setattr(receiver, name, value)
    job = Job(plan_for(chunks), tmp, lambda done, total: None, threading.Event())
    receiver.receive(job)
    return receiver, server, unpacker


@pytest.fixture
def chunks() -> list[bytes]:
    return [os.urandom(200_000) for _ in range(6)] + [os.urandom(70_000)]


def test_async_mode_asks_udp_receiver_to_keep_the_offsets() -> None:
    chunks = [b"abc"]
    async_session = Session.from_plan(plan_for(chunks))
    assert async_session is not None and async_session.mode == "async"
    assert "--ignore-lost-data" in receiver_argv(async_session, "10.0.0.2")
    acked = Session.from_plan(plan_for(chunks, mode="acked"))
    assert acked is not None and "--ignore-lost-data" not in receiver_argv(acked, "10.0.0.2")
    assert Session.from_plan(plan_for(chunks, mode="nak")) is None  # unknown: HTTP


def test_all_by_multicast(tmp_path: Path, chunks: list[bytes]) -> None:
    receiver, server, unpacker = receive(tmp_path, chunks, b"".join(chunks))
    assert unpacker.writes == chunks and unpacker.finished
    assert server.gets == [] and receiver.by_multicast == len(chunks)
    assert receiver.repaired == [] and receiver.left == ""
    assert "--ignore-lost-data" in receiver.spawned[0]


def test_a_damaged_chunk_is_fetched_alone_and_the_stream_goes_on(
    tmp_path: Path, chunks: list[bytes]
) -> None:
    sent = list(chunks)
    sent[1] = damaged(chunks[1])
    sent[4] = damaged(chunks[4])
    receiver, server, unpacker = receive(tmp_path, chunks, b"".join(sent))
    assert unpacker.writes == chunks  # in order, the damaged ones never unpacked
    assert server.gets == [1, 4]  # those two only
    assert receiver.repaired == [1, 4] and receiver.by_multicast == len(chunks) - 2
    assert receiver.left == ""


def test_the_repair_waits_for_the_end_of_the_session(tmp_path: Path, chunks: list[bytes]) -> None:
    """This node's link is full with the session: a fetch during it would only take from
    the session's packets. The chunks after the damaged one wait in the spool."""
    sent = list(chunks)
    sent[1] = damaged(chunks[1])
    go = tmp_path / "go"
    hold = sum(map(len, chunks[:4]))  # the session holds after chunk 3
    server, unpacker = ChunkServer(chunks), KeptUnpacker()
    thread = threading.Thread(
        target=receive,
        args=(tmp_path, chunks, b"".join(sent)),
        kwargs={"hold": (hold, go), "server": server, "unpacker": unpacker},
    )
    thread.start()
    try:
        time.sleep(1.5)  # chunks 0-3 came, chunk 1 damaged
        # nothing fetched during the session; chunks 2 and 3 wait in the spool
        assert server.gets == [] and unpacker.writes == chunks[:1]
    finally:
        go.touch()
        thread.join(20)
    assert server.gets == [1] and unpacker.writes == chunks


def test_a_full_spool_repairs_at_once_and_sets_new_chunks_aside(
    tmp_path: Path, chunks: list[bytes]
) -> None:
    sent = list(chunks)
    sent[0] = damaged(chunks[0])
    # room for two chunks: past half of it the writer repairs at once; past it the
    # reader sets chunks aside for HTTP rather than hold more
    receiver, server, unpacker = receive(
        tmp_path, chunks, b"".join(sent), spool_limit=2 * 200_000 + 1
    )
    assert unpacker.writes == chunks
    assert server.gets[0] == 0 and receiver.repaired[0] == 0
    assert len(server.gets) == len(set(server.gets))  # each chunk fetched once at most


def test_chunk_after_chunk_damaged_means_leaving_for_http(
    tmp_path: Path, chunks: list[bytes]
) -> None:
    """A node that loses slice after slice (a link far slower than the session) gains
    nothing by staying: after three damaged chunks in a row it takes the rest by HTTP."""
    sent = [chunks[0]] + [damaged(c) for c in chunks[1:4]] + chunks[4:]
    receiver, server, unpacker = receive(tmp_path, chunks, b"".join(sent), sleep=30)
    assert unpacker.writes == chunks
    assert server.gets == [1, 2, 3, 4, 5, 6]
    assert receiver.repaired == [1, 2, 3] and receiver.by_multicast == 1
    assert "3 chunks in a row came damaged" in receiver.left


def test_a_receiver_that_dies_leaves_the_rest_to_http(tmp_path: Path, chunks: list[bytes]) -> None:
    sent = chunks[0] + damaged(chunks[1]) + chunks[2] + chunks[3][:1000]
    receiver, server, unpacker = receive(tmp_path, chunks, sent, code=2)
    assert unpacker.writes == chunks
    assert server.gets == [1, 3, 4, 5, 6] and receiver.repaired == [1]
    assert receiver.left.startswith("udp-receiver ended (exit 2)")


def test_a_stalled_session_is_left(tmp_path: Path, chunks: list[bytes]) -> None:
    sent = chunks[0] + chunks[1][:100]
    receiver, server, unpacker = receive(tmp_path, chunks, sent, sleep=30, stall_timeout=0.5)
    assert unpacker.writes == chunks and server.gets == [1, 2, 3, 4, 5, 6]
    assert receiver.left.startswith("no data from the session")


def test_a_repair_that_fails_fails_the_install(tmp_path: Path, chunks: list[bytes]) -> None:
    sent = list(chunks)
    sent[2] = damaged(chunks[2])
    server = ChunkServer(chunks, corrupt=[2, 2])  # both tries come back corrupt
    with pytest.raises(Exception, match="chunk 00000002"):
        receive(tmp_path, chunks, b"".join(sent), server=server)


def test_the_spool_hands_chunks_over_in_order() -> None:
    cancel = threading.Event()
    spool = Spool(1000, cancel)
    assert spool.put(1, b"b" * 100)
    spool.damage(0)
    got: list[bytes | None] = []
    taker = threading.Thread(target=lambda: got.append(spool.take(0)))
    taker.start()
    taker.join(0.5)
    assert taker.is_alive()  # damaged, the session not over, the spool not half full
    spool.end()
    taker.join(5)
    assert got == [None]  # to fetch
    assert spool.take(1) == b"b" * 100 and spool.held == 0
    assert spool.take(2) is None  # never came, the session is over
    assert not spool.put(3, b"c" * 1001) and 3 in spool.damaged  # no room: set aside
    cancel.set()
    with pytest.raises(Cancelled):
        Spool(10, cancel).take(0)


def test_the_spool_limit_follows_the_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    assert spool_limit(str(meminfo)) == 1_024_000_000
    meminfo.write_text("MemAvailable: 100 kB\n")
    assert spool_limit(str(meminfo)) == 64 << 20
    assert spool_limit(str(tmp_path / "none")) == 64 << 20


def test_udp_receivers_stderr_says_once_that_it_joined_and_keeps_its_last_lines() -> None:
    stderr = ReceiverStderr()
    assert not stderr.add(b"Udp-receiver 20120424\nConnec")
    assert stderr.add(b"ted as #3 to 10.77.0.1\n")  # a line split between two reads
    assert not stderr.add(b"bytes=  1 048 576 ( 2.00 Mbps)\r" * 400)  # once only
    assert stderr.joined
    stderr.add(b"Transfer complete.\n\n")
    assert (
        stderr.tail
        == "bytes=  1 048 576 ( 2.00 Mbps) / bytes=  1 048 576 ( 2.00 Mbps) / Transfer complete."
    )
