"""The multicast transport around udpcast: the sender's command and options, the session
addresses, the FIFO that feeds it, and the receiver's way out to HTTP, with a stand-in
for udp-receiver (a small script); real udpcast runs in
tests/integration/test_deploy_multicast.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from corral.agent.errors import Cancelled
from corral.agent.network import raise_rmem_max
from corral.agent.plan import Plan
from corral.agent.receivers import multicast as rx_multicast
from corral.agent.receivers import receiver_class
from corral.agent.receivers.base import Context, Job
from corral.agent.receivers.multicast import (
    RCVBUF,
    MulticastReceiver,
    RateWatch,
    Session,
    receive_buffer,
    receiver_argv,
)
from corral.agent.receivers.stream import Unpacker
from corral.agent.report import Client
from corral.config import Settings, load_settings
from corral.deploy.transports import REGISTRY, multicast
from corral.deploy.transports.base import Member, NotReady, RateBudget
from corral.deploy.transports.multicast import (
    PORT_BASE,
    SLOTS,
    MulticastTransport,
    channel,
    channel_for,
    interface_holding,
    preferred_slot,
    route_interface,
)
from corral.deploy.transports.multicast_options import (
    MulticastOptions,
    fec_parts,
    options_from_settings,
    parse_bitrate,
)
from corral.errors import CorralError, InvalidValue
from corral.images.exports import Chunked
from corral.images.store import ImageVersion
from tests.fakes import UDP_RECEIVER, ChunkServer, KeptUnpacker, stream_plan, stream_version

# --- options ----------------------------------------------------------------------------


def test_defaults_are_valid_and_documented() -> None:
    o = MulticastOptions()
    assert o.mode == "acked" and o.max_bitrate == 19_000_000 and o.fec_used == "8x4/128"
    assert o.retries_until_drop == 12 and o.min_receivers == 0
    assert fec_parts(o.fec_used) == (8, 4, 128)
    # async mode has no retransmissions: its FEC alone absorbs the loss
    assert MulticastOptions(mode="async").fec_used == "8x8/128"
    assert MulticastOptions(mode="async", fec="").fec_used == ""


@pytest.mark.parametrize(
    "fec", ["8x4", "x4/128", "8x4/129", "8x0/128", "0x4/128", "16x4/128", "8x200/128", "a"]
)
def test_bad_fec_is_refused(fec: str) -> None:
    with pytest.raises(InvalidValue, match="fec"):
        MulticastOptions(fec=fec)


@pytest.mark.parametrize(
    "kw",
    [
        {"max_bitrate": 1000},
        {"min_receivers": -1},
        {"min_wait": 10, "max_wait": 5},
        {"retries_until_drop": 0},
        {"leave_below": 1.0},
        {"leave_window": 0},
        {"mode": "nak"},
    ],
)
def test_bad_options_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidValue):
        MulticastOptions(**kw)


def test_bitrates() -> None:
    assert parse_bitrate("19m") == 19_000_000
    assert parse_bitrate("900mbit") == 900_000_000
    assert parse_bitrate("1.5g") == 1_500_000_000
    assert parse_bitrate("64000") == 64000
    assert parse_bitrate(5) == 5
    with pytest.raises(InvalidValue):
        parse_bitrate("fast")


def test_sender_args() -> None:
    """udp-sender never starts on its own count (one above its nodes): corral starts it,
    keeping min_receivers and min_wait itself (Session.ready); --max-wait stays."""
    args = MulticastOptions().sender_args(5)
    assert args == [
        "--max-bitrate", "19000000", "--min-receivers", "6", "--max-wait", "60",
        "--retries-until-drop", "12", "--fec", "8x4/128",
    ]  # fmt: skip
    args = MulticastOptions(fec="", min_receivers=2, min_wait=2.5).sender_args(3)
    assert args[args.index("--min-receivers") + 1] == "4"
    assert "--min-wait" not in args and "--fec" not in args


def test_async_sender_args() -> None:
    """No receiver connects in async mode: udp-sender is told to go after its hellos
    (corral launches it when the nodes are listening), at a fixed rate, with FEC."""
    args = MulticastOptions(mode="async", min_receivers=3).sender_args(5)
    assert args == [
        "--async", "--max-bitrate", "19000000", "--autostart", "10", "--fec", "8x8/128",
    ]  # fmt: skip
    assert MulticastOptions(mode="async", fec="4x2/64").sender_args(5)[-1] == "4x2/64"
    assert MulticastOptions(mode="async").slice_bytes == 1024 * 1456


def test_options_from_settings_where_corral_toml_has_them() -> None:
    assert options_from_settings(Settings(home=Path("/x"))) == MulticastOptions()
    settings = SimpleNamespace(multicast_max_bitrate="900m", multicast_fec="")
    options = options_from_settings(cast(Settings, settings))
    assert options.max_bitrate == 900_000_000 and options.fec == ""
    settings = SimpleNamespace(multicast_mode="async", multicast_fec="auto")
    options = options_from_settings(cast(Settings, settings))
    assert options.mode == "async" and options.fec is None and options.fec_used == "8x8/128"


def test_the_mode_is_a_setting_with_its_choices(tmp_path: Path) -> None:
    (tmp_path / "corral.toml").write_text('multicast_mode = "async"\n')
    assert options_from_settings(load_settings(tmp_path)).mode == "async"
    (tmp_path / "corral.toml").write_text('multicast_mode = "fast"\n')
    with pytest.raises(CorralError, match="multicast_mode"):
        load_settings(tmp_path)


# --- addresses and the interface -----------------------------------------------------------


def test_channels() -> None:
    c = channel(0x1A5)
    assert (c.rdv, c.data, c.portbase) == ("239.194.1.165", "239.195.1.165", PORT_BASE + 0x1A5 * 2)
    top = channel(SLOTS - 1)
    assert top.portbase + 1 < 32768 and top.portbase % 2 == 0
    # stable across restarts, different for deployments in a row and images in one
    assert preferred_slot(7, "a:1") == preferred_slot(7, "a:1")
    slots = {preferred_slot(d, "a:1") for d in range(1, 200)}
    assert len(slots) == 199
    # a slot taken by a live session is not handed out again
    first = channel_for(7, "a:1", set())
    second = channel_for(7, "a:1", {first.slot})
    assert second.slot == (first.slot + 1) % SLOTS
    assert {first.rdv, first.data}.isdisjoint({second.rdv, second.data})


def test_interface_from_ip_json() -> None:
    addr = json.dumps(
        [
            {"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}]},
            {"ifname": "eth0", "addr_info": [{"local": "10.77.0.1", "prefixlen": 24}]},
        ]
    )
    assert interface_holding("10.77.0.1", addr) == "eth0"
    assert interface_holding("10.9.9.9", addr) is None
    route = json.dumps([{"dst": "10.77.0.2", "dev": "eth0", "prefsrc": "10.77.0.1"}])
    assert route_interface(route) == ("eth0", "10.77.0.1")
    assert route_interface("[]") is None


# --- the sender's session ----------------------------------------------------------------


def make_version(tmp: Path, chunks: list[bytes]) -> ImageVersion:
    return stream_version(tmp / "images" / "img" / "v3", chunks, version=3)


@pytest.fixture
def transport(tmp_path: Path) -> MulticastTransport:
    if not shutil.which("udp-sender"):
        pytest.skip("udpcast is not installed")
    return MulticastTransport(Settings(home=tmp_path / "home", server_url="http://10.0.0.1:8080"))


def session_for(
    transport: MulticastTransport, version: ImageVersion, members: dict[str, str | None]
) -> multicast.Session:
    return multicast.Session(
        deployment=12,
        payload=Chunked(version),
        channel=channel_for(12, version.ref, set()),
        interface="eth0",
        options=transport.options,
        directory=transport.directory,
        members=members,
        tag=f"12/{version.ref}/abc",
        chunks=len(json.loads((version.path / "exports/stream.json").read_text())["chunks"]),
    )


def test_the_sender_command(transport: MulticastTransport, tmp_path: Path) -> None:
    version = make_version(tmp_path, [b"a" * 10])
    session = session_for(transport, version, {"n1": "10.0.0.2", "n2": None})
    argv = session.argv()
    c = session.channel
    assert argv[0] == "udp-sender"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--file"] == str(transport.directory / "d12-img-3.fifo")
    assert pairs["--interface"] == "eth0"
    assert pairs["--portbase"] == str(c.portbase)
    assert pairs["--mcast-rdv-address"] == c.rdv
    assert pairs["--mcast-data-address"] == c.data
    assert pairs["--min-receivers"] == "3"
    # corral starts the transfer on its console
    assert "--nokbd" not in argv and "--async" not in argv
    session.options = MulticastOptions(mode="async")
    assert "--nokbd" in session.argv()


@dataclass
class FakeProc:
    code: int | None = None
    pid: int = 4242
    stdin: None = None
    signals: list[str] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.code

    @property
    def returncode(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append("TERM")
        self.code = -15

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code

    def kill(self) -> None:
        self.code = -9


def test_params_name_the_session_while_it_waits_for_its_nodes(
    transport: MulticastTransport, tmp_path: Path
) -> None:
    version = make_version(tmp_path, [b"a" * 10])
    session = session_for(transport, version, {"n1": "10.0.0.2"})
    session.proc = cast(subprocess.Popen[bytes], FakeProc())
    transport.sessions[(12, version.ref)] = session
    params = transport.params(Chunked(version), "n1")
    assert params["base"] == "http://10.0.0.1:8080/images/img/3"
    assert params["session"] == {
        "tag": "12/img:3/abc",
        "rdv": session.channel.rdv,
        "data": session.channel.data,
        "portbase": session.channel.portbase,
        "interface": "10.0.0.2",
        "mode": "acked",
        "max_bitrate": 19_000_000,
        "max_wait": 60.0,
        "leave_below": 0.25,
        "leave_window": 15.0,
    }
    # a node of no session yet waits for it; one too late for it: straight to HTTP
    with pytest.raises(NotReady, match="no multicast session"):
        transport.params(Chunked(version), "n9")
    transport.directory.mkdir(parents=True, exist_ok=True)
    session.log_path.write_bytes(b"New connection from 10.0.0.2\nStarting transfer: 00000009\n")
    assert transport.params(Chunked(version), "n1")["session"] is None
    session.log_path.unlink()
    cast(FakeProc, session.proc).code = 0  # the sender is done
    assert transport.params(Chunked(version), "n1")["session"] is None
    transport.finish(12, version)
    assert not transport.sessions


def test_an_async_session_starts_once_its_nodes_asked(tmp_path: Path) -> None:
    """No receiver connects to an async sender: corral starts it when every node asked
    for its plan and had time to start udp-receiver, or max_wait after the first."""
    transport = MulticastTransport.__new__(MulticastTransport)
    transport.options = MulticastOptions(mode="async", max_wait=30)
    transport.directory = tmp_path
    version = make_version(tmp_path, [b"a" * 10])
    session = session_for(transport, version, {"n1": None, "n2": None, "n3": None})
    settle = multicast.ASYNC_SETTLE
    assert not session.ready(100.0)  # nobody asked
    session.asked = {"n1": 100.0, "n2": 101.0}
    assert not session.ready(101.0 + settle + 5)  # n3 has not asked
    session.asked["n3"] = 110.0
    assert not session.ready(110.0 + settle / 2)  # n3 may not listen yet
    assert session.ready(110.0 + settle)
    session.asked = {"n1": 100.0}
    assert session.ready(130.0)  # max_wait after the first: those there will do
    session.options = MulticastOptions(mode="async", min_receivers=1)
    assert session.ready(100.0 + settle)


def test_an_acknowledged_session_starts_once_its_nodes_joined(tmp_path: Path) -> None:
    """Not on udp-sender's count (which holds a node whose connect reply was lost): when
    every node said it joined, at once; min_receivers and min_wait as the options say;
    max_wait after the first with those there."""
    transport = MulticastTransport.__new__(MulticastTransport)
    transport.options = MulticastOptions(max_wait=30)
    transport.directory = tmp_path
    version = make_version(tmp_path, [b"a" * 10])
    session = session_for(transport, version, {"n1": None, "n2": None, "n3": None})
    assert not session.ready(100.0)  # nobody joined
    session.asked = {"n1": 99.0, "n2": 99.0, "n3": 99.0}  # asking is not joining
    session.joined = {"n1": 100.0, "n2": 101.0}
    assert not session.ready(120.0)
    session.joined["n3"] = 121.0
    assert session.ready(121.0)  # no settle: they listen already
    session.joined = {"n1": 100.0}
    assert not session.ready(129.9)
    assert session.ready(130.0)
    session.options = MulticastOptions(min_receivers=2, min_wait=5)
    session.joined = {"n1": 100.0, "n2": 101.0}
    assert not session.ready(104.0)  # two are enough, but not before min_wait
    assert session.ready(105.0)


def test_an_acknowledged_session_is_started_on_its_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """corral runs udp-sender and holds its transfer until its nodes joined, then starts
    it with a key on its stdin; a join for another session or node counts for nothing."""
    if not shutil.which("udp-sender"):
        pytest.skip("udpcast is not installed")
    settings = Settings(home=tmp_path / "home", address="127.0.0.1")
    transport = MulticastTransport(settings)
    version = make_version(tmp_path, [b"x" * 100])
    launched: list[list[str]] = []
    real_argv = multicast.Session.argv

    def argv(self: multicast.Session) -> list[str]:
        launched.append(real_argv(self))  # what would run; a stand-in reads its console
        return ["sh", "-c", "read -r key; echo 'Starting transfer: 00000009' >&2; sleep 60"]

    monkeypatch.setattr(multicast.Session, "argv", argv)
    transport.start(5, Chunked(version), [Member("n1", "127.0.0.2"), Member("n2", None)])
    try:
        session = transport.sessions[(5, version.ref)]
        tag = transport.params(Chunked(version), "n1")["session"]["tag"]
        assert transport.joined(5, "n1", tag)
        assert not transport.joined(5, "n1", "5/other:1/abc")
        assert not transport.joined(6, "n2", tag)
        assert not transport.joined(5, "n9", tag)
        time.sleep(0.5)
        assert not session.transmitting()
        assert transport.params(Chunked(version), "n2")["session"] is not None
        assert transport.joined(5, "n2", tag)
        deadline = time.monotonic() + 5
        while not session.transmitting() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.transmitting() and session.running()
        assert "--nokbd" not in launched[0]
        assert transport.params(Chunked(version), "n1")["session"] is None  # too late now
    finally:
        transport.close()
    assert session.proc is not None and session.proc.returncode is not None


def test_an_async_session_launches_its_sender_and_then_sends_late_nodes_to_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not shutil.which("udp-sender"):
        pytest.skip("udpcast is not installed")
    settings = Settings(home=tmp_path / "home", address="127.0.0.1")
    transport = MulticastTransport(settings, MulticastOptions(mode="async"))
    version = make_version(tmp_path, [b"x" * 100])
    monkeypatch.setattr(multicast, "ASYNC_SETTLE", 0.2)
    launched: list[list[str]] = []
    real_argv = multicast.Session.argv

    def argv(self: multicast.Session) -> list[str]:
        launched.append(real_argv(self))  # what would run; a stand-in runs
        return ["sleep", "60"]

    monkeypatch.setattr(multicast.Session, "argv", argv)
    transport.start(5, Chunked(version), [Member("n1", "127.0.0.2"), Member("n2", None)])
    try:
        session = transport.sessions[(5, version.ref)]
        time.sleep(0.5)
        assert not session.launched()  # nobody asked yet
        first = transport.params(Chunked(version), "n1")["session"]
        assert first["mode"] == "async"
        time.sleep(0.5)
        assert not session.launched()  # n2 has not asked
        assert transport.params(Chunked(version), "n2")["session"] is not None
        deadline = time.monotonic() + 5
        while not session.launched() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.launched() and session.running()
        assert "--async" in launched[0] and "--autostart" in launched[0]
        assert "--min-receivers" not in launched[0]
        # its hellos may be over before a node asking now listens: HTTP for it
        assert transport.params(Chunked(version), "n1")["session"] is None
    finally:
        transport.close()
    assert session.proc is not None and session.proc.returncode is not None


def test_an_async_session_stopped_before_it_starts_launches_nothing(tmp_path: Path) -> None:
    if not shutil.which("udp-sender"):
        pytest.skip("udpcast is not installed")
    settings = Settings(home=tmp_path / "home", address="127.0.0.1")
    transport = MulticastTransport(settings, MulticastOptions(mode="async"))
    version = make_version(tmp_path, [b"x" * 100])
    transport.start(5, Chunked(version), [Member("n1", "127.0.0.2")])
    session = transport.sessions[(5, version.ref)]
    transport.finish(5, Chunked(version))
    assert session.starter is not None and not session.starter.is_alive()
    assert not session.launched()


def test_the_fifo_carries_the_chunks_in_order(
    transport: MulticastTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [os.urandom(300_000), os.urandom(1 << 20), os.urandom(5)]
    version = make_version(tmp_path, chunks)
    session = session_for(transport, version, {"n1": None})
    out = tmp_path / "received.bin"
    # udp-sender's stand-in reads the FIFO, as it does, after a moment
    monkeypatch.setattr(
        multicast.Session,
        "argv",
        lambda self: ["sh", "-c", f"sleep 0.3; cat {self.fifo} > {out}"],
    )
    session.launch()
    try:
        assert session.pid_path.read_text().strip() == str(session.proc.pid)  # type: ignore[union-attr]
        assert session.proc is not None and session.proc.wait(10) == 0
        assert session.feeder is not None
        session.feeder.join(5)
        assert out.read_bytes() == b"".join(chunks)
        assert session.fed == sum(map(len, chunks))
        assert session.meter.read() == {version.ref: session.fed}  # for /metrics
    finally:
        session.stop()
    assert not session.fifo.exists() and not session.pid_path.exists()


def test_stop_ends_a_sender_that_never_read(
    transport: MulticastTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = make_version(tmp_path, [b"x" * 100])
    session = session_for(transport, version, {"n1": None})
    monkeypatch.setattr(multicast.Session, "argv", lambda self: ["sleep", "60"])
    session.launch()
    started = time.monotonic()
    session.stop()
    assert session.proc is not None and session.proc.returncode is not None
    assert session.feeder is not None and not session.feeder.is_alive()
    assert time.monotonic() - started < 5


def test_start_params_finish_with_a_stand_in_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not shutil.which("udp-sender"):
        pytest.skip("udpcast is not installed")
    settings = Settings(home=tmp_path / "home", address="127.0.0.1")
    transport = MulticastTransport(settings)
    version = make_version(tmp_path, [b"x" * 100])
    members = [Member("n1", "127.0.0.2"), Member("n2", None)]
    monkeypatch.setattr(multicast.Session, "argv", lambda self: ["sleep", "60"])
    transport.start(5, Chunked(version), members)
    try:
        session = transport.sessions[(5, version.ref)]
        assert session.interface == "lo"  # the interface that holds corral's address
        assert session.members == {"n1": "127.0.0.2", "n2": None}
        assert transport.params(Chunked(version), "n2")["session"]["interface"] == ""
        # started again (after a restart): the old sender goes, a new one takes its slot
        old = session.proc
        transport.start(5, Chunked(version), members[:1])
        assert old is not None and old.poll() is not None
        assert transport.sessions[(5, version.ref)].channel == session.channel
    finally:
        transport.close()
    assert not transport.sessions
    # a sender that cannot start (its port taken, say) sends the nodes to HTTP
    monkeypatch.setattr(
        multicast.Session, "argv", lambda self: ["sh", "-c", "echo 'bind: in use' >&2; exit 1"]
    )
    transport.start(6, Chunked(version), members)
    try:
        assert "exited at once (bind: in use)" in caplog.text
        assert transport.params(Chunked(version), "n1")["session"] is None
    finally:
        transport.close()


def test_a_stale_pid_file_kills_only_a_udp_sender(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid_file = tmp_path / "x.pid"
        pid_file.write_text(f"{sleeper.pid}\n")
        multicast._kill_stale(pid_file)
        time.sleep(0.1)
        assert sleeper.poll() is None  # not udp-sender: left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_registered() -> None:
    assert REGISTRY["multicast"] is MulticastTransport
    assert receiver_class("multicast") is MulticastReceiver
    assert Member("n1", None).ip is None


# --- the receiver ---------------------------------------------------------------------------


def chunk_plan(chunks: list[bytes], session: dict[str, Any] | None, deployment: int = 12) -> Plan:
    params: dict[str, Any] = {"base": "http://s/images/img/3", "session": session}
    return stream_plan(chunks, "multicast", params, deployment=deployment, ref="img:3")


def session_params(chunks: list[bytes], **kw: Any) -> dict[str, Any]:
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    values: dict[str, Any] = {
        "tag": f"12/img:3/{sha}",
        "rdv": "239.194.0.1",
        "portbase": 24002,
        "interface": "10.0.0.2",
        "max_bitrate": 19_000_000,
        "max_wait": 1.0,
        "leave_below": 0.25,
        "leave_window": 5.0,
    }
    values.update(kw)
    return values


def test_the_plan_session() -> None:
    chunks = [b"abc"]
    assert Session.from_plan(chunk_plan(chunks, None)) is None
    assert Session.from_plan(chunk_plan(chunks, {"rdv": "x"})) is None  # malformed
    assert Session.from_plan(chunk_plan(chunks, session_params(chunks), deployment=13)) is None
    session = Session.from_plan(chunk_plan(chunks, session_params(chunks)))
    assert session is not None and session.portbase == 24002
    argv = receiver_argv(session, "10.0.0.7")
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "udp-receiver" and "--nokbd" in argv and "--file" not in argv
    assert argv[argv.index("--interface") + 1] == "10.0.0.7"
    assert argv[argv.index("--portbase") + 1] == "24002"
    assert argv[argv.index("--mcast-rdv-address") + 1] == "239.194.0.1"
    assert int(argv[argv.index("--start-timeout") + 1]) > session.max_wait
    assert pairs  # every option has its value
    # a socket buffer of 4 MiB at least: the kernel's 208 KiB overflowed on a busy node
    assert int(pairs["--rcvbuf"]) == RCVBUF == 4 * 2**20
    fast = replace(session, max_bitrate=400_000_000)
    assert receive_buffer(fast) == 50_000_000  # a second of the session
    assert receive_buffer(replace(session, max_bitrate=10**10)) == 64 * 2**20  # at most


def test_the_kernel_limit_is_raised_to_the_buffer_udp_receiver_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = tmp_path / "sys" / "net" / "core"
    core.mkdir(parents=True)
    limit = core / "rmem_max"
    limit.write_text("212992\n")
    assert raise_rmem_max(RCVBUF, tmp_path) == RCVBUF
    assert limit.read_text() == f"{RCVBUF}\n"
    assert raise_rmem_max(1024, tmp_path) == RCVBUF  # never lowered
    assert limit.read_text() == f"{RCVBUF}\n"
    # a kernel that refuses (a network namespace): the limit it keeps
    limit.write_text("212992\n")
    real_write = Path.write_text

    def refuse(path: Path, *args: Any, **kw: Any) -> int:
        if path == limit:
            raise PermissionError(errno.EINVAL, "Invalid argument")
        return real_write(path, *args, **kw)

    monkeypatch.setattr(Path, "write_text", refuse)
    assert raise_rmem_max(RCVBUF, tmp_path) == 212992
    assert raise_rmem_max(RCVBUF, tmp_path / "none") == 0  # no /proc: nothing known


def test_a_node_is_judged_on_several_slices_and_at_least_the_leave_window() -> None:
    # 3 slices of 8 x 128 blocks of 1456 bytes: 18.8 s at 1.9 Mbit/s (the bench's links)
    assert MulticastOptions(max_bitrate=1_900_000).judge_window == pytest.approx(18.8, abs=0.1)
    assert MulticastOptions(max_bitrate=19_000_000).judge_window == 15.0  # 1.9 s < 15
    assert MulticastOptions(max_bitrate=900_000_000, leave_window=20).judge_window == 20
    small_slices = MulticastOptions(max_bitrate=500_000, fec="4x2/64")
    assert small_slices.judge_window == pytest.approx(3 * 4 * 64 * 1456 * 8 / 500_000)


def test_a_start_up_transient_is_not_a_slow_link() -> None:
    """The session's first 12 s at a fifth of its rate (100 receivers answering on a busy
    host), then the full rate: judged on 5 s, as before, the node left for HTTP; on the
    judging window it stays."""
    rate = 1_900_000 / 8
    window = MulticastOptions(max_bitrate=1_900_000).judge_window

    def leaves(window: float) -> bool:
        count = 0
        watch = RateWatch(lambda: count, window=window, period=1)
        for t in range(60):
            count += int(rate / 5 if t < 12 else rate)
            result = watch.sample(float(t), busy=0.0)
            if result is not None and result[0] < 0.25 * 1_900_000:
                return True
        return False

    assert leaves(5.0)  # the old window
    assert not leaves(window)
    # a link at a tenth of the rate is still found out, once the window has passed
    count = 0
    slow = RateWatch(lambda: count, window=window, period=1)
    verdicts = []
    for t in range(25):
        count += int(rate / 10)
        verdicts.append(slow.sample(float(t), busy=0.0))
    first = next(t for t, v in enumerate(verdicts) if v is not None)
    assert first == 19 and verdicts[first] is not None and verdicts[first][0] < 0.25 * 1.9e6


def test_catch_ups_share_one_rate_in_the_order_they_ask() -> None:
    now = [100.0]
    budget = RateBudget(8_000_000, burst=100_000, clock=lambda: now[0])  # 1 MB/s
    assert budget.reserve(64_000) == 0.0  # within the burst: at once
    assert budget.reserve(36_000) == 0.0
    # two fetchers asking for 0.5 MB each: the second waits for the first's turn
    assert budget.reserve(500_000) == pytest.approx(0.5)
    assert budget.reserve(500_000) == pytest.approx(1.0)
    now[0] = 110.0  # a quiet spell: the burst is there again, not ten seconds of credit
    assert budget.reserve(100_000) == 0.0
    assert budget.reserve(100_000) == pytest.approx(0.1)


def test_the_sessions_catch_ups_are_paced_while_its_sender_runs(
    transport: MulticastTransport, tmp_path: Path
) -> None:
    version = make_version(tmp_path, [b"a" * 10])
    session = session_for(transport, version, {"n1": "10.0.0.2"})
    session.budget = RateBudget(19_000_000)
    transport.sessions[(12, version.ref)] = session
    assert transport.pacer(12, version.ref) is None  # no udp-sender: all on HTTP anyway
    session.proc = cast(subprocess.Popen[bytes], FakeProc())
    assert transport.pacer(12, version.ref) is session.budget
    assert transport.pacer(13, version.ref) is None  # another deployment
    transport.finish(12, version)


def test_the_catch_up_rate_defaults_to_the_session_rate_and_is_a_setting(
    tmp_path: Path,
) -> None:
    assert MulticastOptions(max_bitrate=2_000_000).catch_up_rate == 2_000_000
    settings = Settings(home=tmp_path, multicast_catchup_bitrate="5g")
    assert options_from_settings(settings).catch_up_rate == 5_000_000_000
    assert options_from_settings(Settings(home=tmp_path)).catchup_bitrate == 0
    with pytest.raises(InvalidValue, match="catchup_bitrate"):
        MulticastOptions(catchup_bitrate=10)


def test_the_rate_watch_tells_a_slow_link_from_a_pause() -> None:
    count = 0
    watch = RateWatch(lambda: count, window=5, period=1)
    rate = 19e6 / 8  # bytes per second at the session's rate
    results = []
    # full rate, then a 3 s pause while the sender drops a dead node, then full rate
    for t in range(12):
        count += 0 if 4 <= t < 7 else int(rate)
        results.append(watch.sample(float(t), busy=0.0))
    assert results[:5] == [None] * 5
    assert all(r is not None and r[0] > 0.9 * 19e6 for r in results[5:])
    # a link that carries a tenth of it, every second
    slow = RateWatch(lambda: count, window=5, period=1)
    for t in range(7):
        count += int(rate / 10)
        last = slow.sample(float(t), busy=float(t) * 0.1)
    assert last is not None and last[0] < 0.25 * 19e6 and last[1] == pytest.approx(0.1)


class Faked(MulticastReceiver):
    """The receiver with udp-receiver, the unpacker and the interface replaced."""

    def __init__(
        self,
        context: Context,
        spawn: Callable[[list[str]], subprocess.Popen[bytes]],
        unpacker: KeptUnpacker | None = None,
        interface: str | None = None,
        rx: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(context)
        self.spawn_fn = spawn
        self.unpacker = unpacker
        self.interface = interface
        self.rx = rx
        self.room: list[int] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return self.spawn_fn(argv)

    def make_room(self, wanted: int) -> None:
        self.room.append(wanted)

    def make_unpacker(self, target_dir: Path) -> Unpacker:
        if self.unpacker is None:
            return super().make_unpacker(target_dir)
        return cast(Unpacker, self.unpacker)

    def interface_name(self, address: str) -> str | None:
        return self.interface

    def rx_bytes(self, interface: str) -> int | None:
        return self.rx() if self.rx is not None else None


@dataclass
class Harness:
    tmp: Path
    chunks: list[bytes]
    sent: bytes  # what the stand-in writes
    code: int = 0
    connect: bool = True
    sleep: float = 0.0
    session: dict[str, Any] | None = None
    spawned: list[list[str]] = field(default_factory=list)
    #: the session tags the receiver said it joined
    joined: list[str] = field(default_factory=list)

    def run(
        self, interface: str | None = None, rx: Callable[[], int] | None = None, **attrs: Any
    ) -> tuple[MulticastReceiver, ChunkServer, KeptUnpacker, list[int]]:
        server = ChunkServer(self.chunks)
        unpacker = KeptUnpacker()
        script = self.tmp / "fake_udp_receiver.py"
        script.write_text(UDP_RECEIVER)
        data = self.tmp / "sent.bin"
        data.write_bytes(self.sent)
        harness = self

        def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
            harness.spawned.append(argv)
            fake = [sys.executable, str(script), str(data), str(harness.code),
                    "yes" if harness.connect else "no", str(harness.sleep)]  # fmt: skip
            return subprocess.Popen(fake, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        context = Context(cast(Client, server), tries=2, poll=0.02, joined=self.joined.append)
        receiver = Faked(context, spawn, unpacker, interface, rx)
        for name, value in attrs.items():
            setattr(receiver, name, value)
        seen: list[int] = []
        session = self.session if self.session is not None else session_params(self.chunks)
        plan = chunk_plan(self.chunks, session or None)
        receiver.receive(
            Job(plan, self.tmp, lambda done, total: seen.append(done), threading.Event())
        )
        return receiver, server, unpacker, seen


@pytest.fixture
def chunks() -> list[bytes]:
    return [os.urandom(1 << 20), os.urandom(1 << 20), os.urandom(300_000)]


def test_all_by_multicast(tmp_path: Path, chunks: list[bytes]) -> None:
    h = Harness(tmp_path, chunks, b"".join(chunks))
    receiver, server, unpacker, seen = h.run()
    assert unpacker.writes == chunks and unpacker.finished
    assert server.gets == [] and receiver.left == ""
    assert h.joined == [session_params(chunks)["tag"]]  # told once, as udp-receiver said
    assert h.spawned[0][0] == "udp-receiver"
    # room made in the kernel for the socket buffer udp-receiver asks for
    rcvbuf = h.spawned[0][h.spawned[0].index("--rcvbuf") + 1]
    assert cast(Faked, receiver).room == [int(rcvbuf)]
    # progress as the bytes arrive, not only at chunk boundaries
    assert any(0 < n < len(chunks[0]) for n in seen)
    assert seen[-1] == sum(map(len, chunks))


def test_a_dropped_node_goes_on_by_http_from_the_chunk_it_lacks(
    tmp_path: Path, chunks: list[bytes]
) -> None:
    sent = chunks[0] + chunks[1][:1000]  # then udp-sender dropped it
    receiver, server, unpacker, _ = Harness(tmp_path, chunks, sent, code=1).run()
    assert unpacker.writes == chunks
    assert server.gets == [1, 2]
    assert receiver.left == "the sender dropped this node"


def test_a_bad_chunk_is_never_unpacked(tmp_path: Path, chunks: list[bytes]) -> None:
    bad = bytearray(chunks[1])
    bad[1234] ^= 0xFF
    sent = chunks[0] + bytes(bad) + chunks[2]
    receiver, server, unpacker, _ = Harness(tmp_path, chunks, sent).run()
    assert unpacker.writes == chunks  # chunk 1 came from HTTP, the bad one went nowhere
    assert server.gets == [1, 2]
    assert "chunk 00000001 from the session did not match" in receiver.left


def test_another_sessions_stream_is_refused_at_its_first_chunk(
    tmp_path: Path, chunks: list[bytes]
) -> None:
    other = [os.urandom(len(c)) for c in chunks]
    receiver, server, unpacker, _ = Harness(tmp_path, chunks, b"".join(other)).run()
    assert unpacker.writes == chunks and server.gets == [0, 1, 2]
    assert "chunk 00000000" in receiver.left


def test_a_late_node_that_finds_no_sender(tmp_path: Path, chunks: list[bytes]) -> None:
    h = Harness(tmp_path, chunks, b"", connect=False, sleep=30)
    started = time.monotonic()
    receiver, server, unpacker, _ = h.run(connect_timeout=0.5)
    assert time.monotonic() - started < 10
    assert unpacker.writes == chunks and server.gets == [0, 1, 2]
    assert receiver.left.startswith("no udpcast sender answered")
    assert h.joined == []


def test_a_stalled_session_is_left(tmp_path: Path, chunks: list[bytes]) -> None:
    h = Harness(tmp_path, chunks, chunks[0], sleep=30)
    receiver, server, unpacker, _ = h.run(stall_timeout=0.5)
    assert unpacker.writes == chunks and server.gets == [1, 2]
    assert receiver.left.startswith("no data from the session")


def test_a_session_that_resends_for_a_slower_node_is_waited_for(
    tmp_path: Path, chunks: list[bytes]
) -> None:
    """No new byte, but the session's packets keep arriving (the sender resends for a
    receiver slower than this one, which is judged on leave_window before it leaves):
    the node stays 2 x leave_window past the stall limit. Without them, it leaves at the
    limit. (The reason says which limit it left at: the first is given only past the
    longer one.)"""
    count = [0]

    def arriving() -> int:
        count[0] += 19_000_000 // 8 // 10  # the session's rate, sampled every 0.1 s
        return count[0]

    session = session_params(chunks, leave_window=1.0, leave_below=0.0)
    h = Harness(tmp_path, chunks, chunks[0], sleep=30, session=session)
    receiver, server, unpacker, _ = h.run(
        interface="eth0", rx=arriving, rate_period=0.1, stall_timeout=0.5
    )
    assert unpacker.writes == chunks and server.gets == [1, 2]
    assert receiver.left.startswith("the session sent nothing new for")

    h = Harness(tmp_path, chunks, chunks[0], sleep=30, session=session)
    receiver, server, unpacker, _ = h.run(
        interface="eth0", rx=lambda: 1000, rate_period=0.1, stall_timeout=0.5
    )
    assert receiver.left.startswith("no data from the session")


def test_a_session_that_never_starts(tmp_path: Path, chunks: list[bytes]) -> None:
    h = Harness(tmp_path, chunks, b"", sleep=30, session=session_params(chunks, max_wait=0.2))
    receiver, server, _, _ = h.run(start_margin=0.3)
    assert server.gets == [0, 1, 2]
    assert receiver.left == "the session did not start sending"


def test_no_session_in_the_plan_means_http(tmp_path: Path, chunks: list[bytes]) -> None:
    h = Harness(tmp_path, chunks, b"", session={})
    receiver, server, unpacker, _ = h.run()
    assert h.spawned == [] and server.gets == [0, 1, 2] and unpacker.writes == chunks
    assert receiver.left == "the plan names no multicast session to join"


def test_a_node_whose_link_is_too_slow_leaves(tmp_path: Path, chunks: list[bytes]) -> None:
    count = [0]

    def rx_bytes() -> int:
        count[0] += 2_000_000 // 8 // 10  # 2 Mbit/s, sampled every 0.1 s
        return count[0]

    h = Harness(
        tmp_path,
        chunks,
        chunks[0],
        sleep=30,
        session=session_params(chunks, leave_window=0.5),
    )
    receiver, server, unpacker, _ = h.run(interface="eth0", rx=rx_bytes, rate_period=0.1)
    assert unpacker.writes == chunks and server.gets == [1, 2]
    assert receiver.left.startswith("this node's link carried")


def test_a_cancel_stops_udp_receiver(tmp_path: Path, chunks: list[bytes]) -> None:
    script = tmp_path / "r.py"
    script.write_text(UDP_RECEIVER)
    data = tmp_path / "sent.bin"
    data.write_bytes(chunks[0])
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, str(script), str(data), "0", "yes", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        return p

    unpacker = KeptUnpacker()
    receiver = Faked(Context(cast(Client, ChunkServer(chunks)), poll=0.02), spawn, unpacker)
    event = threading.Event()
    threading.Timer(0.5, event.set).start()
    with pytest.raises(Cancelled):
        receiver.receive(
            Job(chunk_plan(chunks, session_params(chunks)), tmp_path, lambda d, t: None, event)
        )
    assert procs[0].returncode is not None and unpacker.aborted


def test_udp_receiver_missing_means_http(tmp_path: Path, chunks: list[bytes]) -> None:
    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        raise FileNotFoundError(2, "No such file or directory", "udp-receiver")

    unpacker = KeptUnpacker()
    receiver = Faked(Context(cast(Client, ChunkServer(chunks)), poll=0.02), spawn, unpacker)
    got = receiver.receive(
        Job(
            chunk_plan(chunks, session_params(chunks)),
            tmp_path,
            lambda d, t: None,
            threading.Event(),
        )
    )
    assert got.details["unicast"] == 3 and got.details["multicast"] == 0
    assert receiver.left.startswith("udp-receiver did not start")


def test_the_real_unpacker_gets_only_checked_chunks(tmp_path: Path) -> None:
    """End to end through zstd | tar with a stream cut into chunks, as the export is."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hi\n")
    (tree / "blob").write_bytes(os.urandom(700_000))
    stream = subprocess.run(
        f"tar -C {tree} -cf - . | zstd -q -c", shell=True, check=True, capture_output=True
    ).stdout
    size = 256 * 1024
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    script = tmp_path / "r.py"
    script.write_text(UDP_RECEIVER)
    data = tmp_path / "sent.bin"
    data.write_bytes(stream[: size + 10])  # one chunk, then dropped

    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(script), str(data), "1", "yes", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    receiver = Faked(Context(cast(Client, ChunkServer(chunks)), poll=0.02), spawn)
    target = tmp_path / "target"
    target.mkdir()
    got = receiver.receive(
        Job(
            chunk_plan(chunks, session_params(chunks)), target, lambda d, t: None, threading.Event()
        )
    )
    assert (target / "etc" / "hello").read_text() == "hi\n"
    assert (target / "blob").read_bytes() == (tree / "blob").read_bytes()
    assert got.details["multicast"] == 1 and got.details["unicast"] == len(chunks) - 1


def test_the_local_address_comes_from_the_route_to_corral() -> None:
    receiver = MulticastReceiver(Context(cast(Client, ChunkServer([]))))
    session = Session("t", "239.194.0.1", 24000, "10.0.0.2", 19_000_000, 30, 0.25, 5)
    assert receiver.local_address(session) == "127.0.0.1"
    assert MulticastReceiver(Context(None)).local_address(session) == "10.0.0.2"
    assert rx_multicast.CONNECT_TIMEOUT < rx_multicast.STALL_TIMEOUT
