"""The testbed's pure parts: option parsing, addressing, the commands it would run, its
state file, and the firmware's token fetch against a local HTTP server."""

from __future__ import annotations

import argparse
import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from corral.config import Settings
from corral.cpio import newc_archive
from corral.errors import InvalidValue, UsageError
from corral.testbed import cluster, firmware
from corral.testbed.cluster import (
    MAX_NODES,
    endpoint_commands,
    format_rate,
    hub_commands,
    loss_filter,
    node_ip,
    node_mac,
    node_name,
    parse_loss,
    parse_rate,
    parse_size,
    parse_slow,
    plan,
    tbf,
)

# --- rates, loss, sizes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("20mbit", 20_000_000),
        ("20Mbit", 20_000_000),
        ("2.5mbit", 2_500_000),
        ("200mbit", 200_000_000),
        ("1gbit", 1_000_000_000),
        ("512kbit", 512_000),
        ("64000bit", 64_000),
        (" 10mbit ", 10_000_000),
        (3_000_000, 3_000_000),
    ],
)
def test_parse_rate(text: str | int, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["20", "20mb", "fast", "", "-1mbit", "1e6bit", "20 mbit"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(InvalidValue, match="bad rate"):
        parse_rate(text)


def test_parse_rate_explains_tc_bps() -> None:
    with pytest.raises(InvalidValue) as info:
        parse_rate("20mbps")
    assert info.value.hint is not None and "megabytes" in info.value.hint


@pytest.mark.parametrize("text", ["1bit", "7kbit", "101gbit", 0])
def test_parse_rate_range(text: str | int) -> None:
    with pytest.raises(InvalidValue, match="out of range"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("bps", "text"),
    [(20_000_000, "20mbit"), (2_500_000, "2500kbit"), (10**9, "1gbit"), (8_001, "8001bit")],
)
def test_format_rate_round_trips(bps: int, text: str) -> None:
    assert format_rate(bps) == text
    assert parse_rate(text) == bps


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("1%", 0.01), ("0.5%", 0.005), ("1", 0.01), ("0%", 0.0), (None, 0.0), (0.02, 0.02)],
)
def test_parse_loss(text: str | float | None, fraction: float) -> None:
    assert parse_loss(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text", ["100%", "150%", "-1%", "x", "1%%", ""])
def test_parse_loss_rejects(text: str) -> None:
    with pytest.raises(InvalidValue, match="loss"):
        parse_loss(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1G", 1024**3), ("512M", 512 * 1024**2), ("2GiB", 2 * 1024**3), ("1t", 1024**4)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1Q", "G", "1.5G", "10K", "2P"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_size(text)


# --- addressing ------------------------------------------------------------------------


def test_addressing() -> None:
    assert [node_name(1), node_name(42), node_name(250)] == ["tb001", "tb042", "tb250"]
    assert node_ip(1) == "10.77.0.2"
    assert node_ip(MAX_NODES) == "10.77.0.251"
    assert node_mac(1) == "02:cb:00:00:00:01"
    assert node_mac(250) == "02:cb:00:00:00:fa"
    assert node_mac(258) == "02:cb:00:00:01:02"
    ips = {node_ip(i) for i in range(1, MAX_NODES + 1)}
    macs = {node_mac(i) for i in range(1, MAX_NODES + 1)}
    assert len(ips) == len(macs) == MAX_NODES
    assert "10.77.0.1" not in ips  # the server's


@pytest.mark.parametrize("index", [0, MAX_NODES + 1])
def test_node_ip_range(index: int) -> None:
    with pytest.raises(InvalidValue):
        node_ip(index)


# --- --slow ----------------------------------------------------------------------------

NAMES = [node_name(i) for i in range(1, 11)]


def test_parse_slow() -> None:
    assert parse_slow(["tb007=2mbit"], NAMES) == {"tb007": 2_000_000}
    assert parse_slow(["tb[001-003]=1mbit", "5=500kbit"], NAMES) == {
        "tb001": 1_000_000,
        "tb002": 1_000_000,
        "tb003": 1_000_000,
        "tb005": 500_000,
    }
    assert parse_slow({"tb002": "3mbit"}, NAMES) == {"tb002": 3_000_000}
    assert parse_slow([], NAMES) == {}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("tb011=2mbit", "unknown node 'tb011'"),
        ("n007=2mbit", "unknown node 'n007'"),
        ("tb007", "bad --slow"),
        ("=2mbit", "bad --slow"),
        ("tb007=", "bad --slow"),
        ("tb007=slow", "bad rate"),
    ],
)
def test_parse_slow_rejects(item: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        parse_slow([item], NAMES)


# --- the plan --------------------------------------------------------------------------


def test_plan() -> None:
    state = plan(
        5, "20mbit", server_link="200mbit", loss="1%", slow=["tb003=2mbit"], disk_size="64M"
    )
    assert [n.name for n in state.nodes] == ["tb001", "tb002", "tb003", "tb004", "tb005"]
    assert [n.rate for n in state.nodes] == [20_000_000] * 2 + [2_000_000] + [20_000_000] * 2
    assert state.server_link == 200_000_000
    assert state.loss == pytest.approx(0.01)
    assert state.disk_size == 64 * 1024**2
    assert state.netmask == "255.255.255.0"
    node = state.nodes[2]
    assert (node.namespace, node.port, node.ip) == ("ctb-tb003", "t003", "10.77.0.4")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "--nodes 0"),
        ({"nodes": 251}, "--nodes 251"),
        ({"nodes": 3, "http_port": 0}, "--http-port"),
        ({"nodes": 3, "http_port": 70000}, "--http-port"),
        ({"nodes": 3, "link": "fast"}, "bad rate"),
        ({"nodes": 3, "server_link": "1x"}, "bad rate"),
        ({"nodes": 3, "loss": "200%"}, "loss"),
        ({"nodes": 3, "slow": ["tb004=1mbit"]}, "unknown node"),
        ({"nodes": 3, "disk_size": "0"}, "disk size"),
    ],
)
def test_plan_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan(**kwargs)  # type: ignore[arg-type]


def test_up_checks_input_before_creating_anything(tmp_path: Path) -> None:
    testbed = cluster.Testbed(Settings(home=tmp_path / "home"))
    with pytest.raises(InvalidValue):
        testbed.up(0)
    with pytest.raises(InvalidValue):
        testbed.up(3, slow=["tb009=1mbit"])
    assert not (tmp_path / "home").exists()


def test_state_round_trip() -> None:
    state = plan(3, "20mbit", loss="0.5%")
    state.server_url = "http://10.77.0.1:8080"
    assert cluster.TestbedState.from_json(state.to_json()) == state
    with pytest.raises(ValueError):
        cluster.TestbedState.from_json('{"version": 99}')


# --- the commands ----------------------------------------------------------------------


def test_hub_commands() -> None:
    state = plan(3, "20mbit", loss="1%", slow=["tb002=2mbit"])
    ip, tc = hub_commands(state)
    assert "link add br0 type bridge mcast_snooping 0 stp_state 0 forward_delay 0" in ip
    assert "link add s0 type veth peer name eth0 netns ctb-srv" in ip
    assert "link add t002 type veth peer name eth0 address 02:cb:00:00:00:02 netns ctb-tb002" in ip
    assert "link set t002 master br0" in ip
    # Every interface name fits the kernel's 15 characters, even at 250 nodes.
    big, _ = hub_commands(plan(MAX_NODES))
    names = [line.split()[2] for line in big if line.startswith("link add")]
    assert max(len(n) for n in names) <= 15
    assert tc[0].startswith("qdisc add dev t001 root tbf rate 20000000bit")
    assert any(line.startswith("qdisc add dev t002 root tbf rate 2000000bit") for line in tc)
    assert sum("clsact" in line for line in tc) == 3
    assert sum("egress bpf da" in line for line in tc) == 3
    _, no_loss = hub_commands(plan(3, "20mbit"))
    assert not any("clsact" in line for line in no_loss)


def test_tbf_bucket() -> None:
    assert tbf("eth0", 2_000_000) == (
        "qdisc add dev eth0 root tbf rate 2000000bit burst 32768 latency 50ms"
    )
    # Fast links get 4 ms of traffic in the bucket.
    assert "burst 5000000 " in tbf("eth0", 10 * 10**9)


def test_loss_filter_threshold() -> None:
    lines = loss_filter("t001", 0.01)
    program = lines[1].split('"')[1].split(",")
    assert program[0] == "4"  # instructions
    assert program[1] == "32 0 0 4294963256"  # ld rand
    assert program[2] == f"53 0 1 {round(0.01 * 2**32)}"  # jge: pass, else drop
    assert program[3:] == ["6 0 0 0", "6 0 0 2"]  # TC_ACT_OK, TC_ACT_SHOT


def test_endpoint_commands() -> None:
    text = endpoint_commands("10.77.0.2", 24)
    assert "addr add 10.77.0.2/24 dev eth0" in text
    assert "addrgenmode none" in text


# --- the firmware ----------------------------------------------------------------------


def test_read_newc() -> None:
    archive = newc_archive({"etc/corral/node-token": (b"t0ken\n", 0o600), "a/b": (b"xyz", 0o644)})
    assert firmware.read_newc(archive) == {"etc/corral/node-token": b"t0ken\n", "a/b": b"xyz"}
    with pytest.raises(firmware.BootFailed):
        firmware.read_newc(b"garbage" * 20)


class TokenServer(ThreadingHTTPServer):
    statuses: list[int]
    paths: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: TokenServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        body = b'{"detail": "node tb001 is not armed for install"}'
        if status == 200:
            body = gzip.compress(newc_archive({"etc/corral/node-token": (b"s3cret\n", 0o600)}))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    server = TokenServer(("127.0.0.1", 0), _Handler)
    server.statuses, server.paths = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(server: TokenServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_firmware_waits_while_refused(
    token_server: TokenServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_server.statuses = [403, 403]
    args = argparse.Namespace(
        server=_url(token_server), node="tb001", disk="/dev/loop9", dir=tmp_path / "tb001",
        interface="eth0", timeout=10.0, retry=0.05, agent="stand-in --flag",
    )  # fmt: skip
    argv = firmware.boot(args)
    assert token_server.paths == ["/boot/token/tb001.cpio.gz"] * 3
    directory = tmp_path / "tb001"
    assert (directory / "token").read_bytes() == b"s3cret\n"
    assert (directory / "token").stat().st_mode & 0o777 == 0o600
    assert (directory / "cmdline").read_text().split() == [
        f"corral.server={_url(token_server)}",
        "corral.node=tb001",
        "corral.mode=deploy",
        "corral.agent_exit=exit",
    ]
    assert argv[:2] == ["stand-in", "--flag"]
    assert argv[2:] == [
        "--cmdline", str(directory / "cmdline"), "--token-file", str(directory / "token"),
        "--log-file", str(directory / "agent.log"), "--run-dir", str(directory / "run"),
        "--interface", "eth0", "--disk", "/dev/loop9", "--work-dir", str(directory / "target"),
    ]  # fmt: skip
    console = capsys.readouterr().out
    assert console.count("403") == 1  # the same refusal is said once, not every retry


def test_firmware_gives_up(token_server: TokenServer, tmp_path: Path) -> None:
    token_server.statuses = [403] * 100
    url = _url(token_server)
    argv = ["--server", url, "--node", "tb001", "--disk", "/dev/loop9", "--dir", str(tmp_path),
            "--timeout", "0.3", "--retry", "0.05"]  # fmt: skip
    assert firmware.main(argv) == 1
    assert not (tmp_path / "token").exists()


def test_power_entry_point_names_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m corral.testbed power`` (the nodes' power_command) fails in one line
    plus a hint, with the CLI's exit code, when no testbed is up."""
    from corral.testbed.__main__ import main

    assert main(["power", "tb001", "cycle", "--home", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: no testbed is up",
        "hint: start one with 'corral testbed up --nodes N'",
    ]
