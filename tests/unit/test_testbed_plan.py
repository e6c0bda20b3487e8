"""The testbed's pure parts: option parsing, addressing, the commands it would run, its
state file, and the firmware's boot against the scripts corral serve renders."""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from corral.agent.cmdline import BootOrders
from corral.config import Settings
from corral.cpio import newc_archive
from corral.errors import CorralError, InvalidValue, UsageError
from corral.inventory import db
from corral.inventory.schema import GroupSpec
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.testbed import cluster, firmware
from corral.testbed.inventory import register_nodes, release_nodes
from corral.testbed.links import (
    SPARSE_BYTES,
    endpoint_commands,
    host_shaping,
    hub_commands,
    loss_filter,
    neighbour_commands,
    tbf,
)
from corral.testbed.plan import (
    MAX_NODES,
    format_rate,
    node_ip,
    node_mac,
    node_name,
    parse_loss,
    parse_rate,
    parse_size,
    parse_slow,
    plan,
    rack_sizes,
    summarize_racks,
)
from tests.conftest import corral

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
        ({"nodes": 4, "racks": 0}, "--racks 0 is out of range"),
        ({"nodes": 4, "racks": -1}, "--racks -1 is out of range"),
        ({"nodes": 4, "racks": 5}, "--racks 5 is more than the 4 nodes"),
        ({"nodes": 4, "rack_uplink": "4mbit"}, "--rack-uplink needs --racks"),
        ({"nodes": 4, "racks": 2, "rack_uplink": "4mbps"}, "--rack-uplink: bad rate '4mbps'"),
        ({"nodes": 4, "racks": 2, "rack_uplink": "1bit"}, "--rack-uplink: rate 1bit is out"),
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
    with pytest.raises(InvalidValue):
        testbed.up(3, racks=4)
    assert not (tmp_path / "home").exists()


def test_down_asks_a_busy_loop_device_again_until_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # losetup --detach of a device still open only marks it; down asks again
    testbed = cluster.Testbed(Settings(home=tmp_path / "home"))
    listed = iter([["/dev/loop7"], ["/dev/loop7"], []])
    asked: list[list[str]] = []
    monkeypatch.setattr(testbed, "loop_devices", lambda: next(listed))
    monkeypatch.setattr(cluster, "run", lambda argv, **_: asked.append(argv))
    assert testbed._detached(5.0) == []
    assert asked == [["losetup", "--detach", "/dev/loop7"]] * 2
    # one that never goes is reported once the wait is over
    monkeypatch.setattr(testbed, "loop_devices", lambda: ["/dev/loop7"])
    assert testbed._detached(0.6) == ["/dev/loop7"]


# --- racks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "racks", "sizes"),
    [
        (100, 4, [25] * 4),
        (10, 4, [3, 3, 2, 2]),
        (100, 3, [34, 33, 33]),
        (7, 1, [7]),
        (5, 5, [1] * 5),
    ],
)
def test_rack_sizes(nodes: int, racks: int, sizes: list[int]) -> None:
    assert rack_sizes(nodes, racks) == sizes


def test_plan_racks() -> None:
    state = plan(100, "2mbit", racks=4, rack_uplink="50mbit")
    assert [(r.name, r.uplink) for r in state.racks] == [
        (f"r{i}", 50_000_000) for i in (1, 2, 3, 4)
    ]
    by_rack = {r.name: [n.name for n in state.rack_nodes(r.name)] for r in state.racks}
    assert by_rack["r1"] == [node_name(i) for i in range(1, 26)]
    assert by_rack["r4"][0] == "tb076" and by_rack["r4"][-1] == "tb100"
    assert sum(len(names) for names in by_rack.values()) == 100
    assert summarize_racks(state) == "4 racks of 25 nodes, 50mbit uplinks"
    uneven = plan(10, racks=4)
    assert [n.rack for n in uneven.nodes] == ["r1"] * 3 + ["r2"] * 3 + ["r3"] * 2 + ["r4"] * 2
    assert summarize_racks(uneven) == "4 racks of 2-3 nodes, unshaped uplinks"
    flat = plan(4)
    assert flat.racks == [] and {n.rack for n in flat.nodes} == {""}
    assert summarize_racks(flat) == ""


def test_hub_commands_with_racks() -> None:
    state = plan(4, "20mbit", racks=2, rack_uplink="4mbit")
    ip, tc = hub_commands(state)
    for rack in ("r1", "r2"):
        assert f"link add br-{rack} type bridge mcast_snooping 0 stp_state 0 forward_delay 0" in ip
        assert f"link add {rack}-core type veth peer name {rack}-up" in ip
        assert f"link set {rack}-core master br0" in ip
        assert f"link set {rack}-up master br-{rack}" in ip
        # Shaped where packets leave: into the rack at the core end, out of it at its own.
        assert f"qdisc add dev {rack}-core root tbf rate 4000000bit burst 32768 latency 50ms" in tc
        assert f"qdisc add dev {rack}-up root tbf rate 4000000bit burst 32768 latency 50ms" in tc
    assert "link set s0 master br0" in ip  # the server stays on the core
    masters = {line.split()[2]: line.split()[4] for line in ip if " master " in line}
    assert [masters[f"t00{i}"] for i in (1, 2, 3, 4)] == ["br-r1", "br-r1", "br-r2", "br-r2"]
    # Every name fits the kernel's 15 characters, even with a rack per node.
    big, _ = hub_commands(plan(MAX_NODES, racks=MAX_NODES))
    names = [line.split()[i] for line in big if line.startswith("link add") for i in (2, 6)]
    assert max(len(n) for n in names) <= 15
    # Unshaped uplinks have no qdisc; without racks there is one bridge, as ever.
    _, tc = hub_commands(plan(4, racks=2))
    assert not any("-core" in line or "-up" in line for line in tc)
    ip, _ = hub_commands(plan(4))
    assert not any("br-" in line or "-core" in line for line in ip)


def test_state_with_racks_round_trips_and_old_states_load() -> None:
    state = plan(6, racks=3, rack_uplink="10mbit")
    assert cluster.TestbedState.from_json(state.to_json()) == state
    old = json.loads(plan(2).to_json())
    del old["racks"]
    for node in old["nodes"]:
        del node["rack"]
    loaded = cluster.TestbedState.from_json(json.dumps(old))
    assert loaded.racks == [] and loaded.nodes[0].rack == ""


def test_inventory_knows_the_racks(home: Path) -> None:
    """Each node's rack is a variable and a group; a testbed without racks leaves none."""
    register_nodes(db.engine(), plan(4, racks=2))
    with db.inventory() as inv:
        specs = {s.name: s for s in inv.specs("node")}
        assert {n: (s.variables["rack"], s.groups) for n, s in specs.items()} == {
            "tb001": ("r1", ["testbed", "r1"]),
            "tb002": ("r1", ["testbed", "r1"]),
            "tb003": ("r2", ["testbed", "r2"]),
            "tb004": ("r2", ["testbed", "r2"]),
        }
        inv.put("group", [GroupSpec(name="r9", variables={"row": 3})])  # an admin's
    register_nodes(db.engine(), plan(4, racks=4))
    with db.inventory() as inv:
        assert inv.node("tb002").groups == ["testbed", "r2"]
        assert inv.node("tb002").variables["rack"] == "r2"
    register_nodes(db.engine(), plan(4))
    with db.inventory() as inv:
        assert all("rack" not in s.variables and s.groups == ["testbed"] for s in inv.specs("node"))
    assert release_nodes(db.engine(), forget=True)[0] == ["tb001", "tb002", "tb003", "tb004"]
    with db.inventory() as inv:
        assert inv.names("group") == ["r9"]  # the testbed's own groups went with the nodes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--racks", "5"], "error: --racks 5 is more than the 4 nodes"),
        (["--racks", "0"], "error: --racks 0 is out of range"),
        (["--rack-uplink", "4mbit"], "error: --rack-uplink needs --racks"),
        (["--racks", "2", "--rack-uplink", "4"], "error: --rack-uplink: bad rate '4'"),
    ],
)
def test_cli_refuses_bad_racks(home: Path, args: list[str], message: str) -> None:
    result = corral("testbed", "up", "--nodes", "4", *args, home=home)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == message or lines[0].startswith(message + " "), result.stderr
    assert lines[1].startswith("hint: ")
    assert not (home / "testbed").exists()


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
    assert "link add s0 type veth peer name eth0 address 02:cb:00:00:00:00 netns ctb-srv" in ip
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


def test_host_shaping_puts_small_packets_first_and_keeps_tbfs_queue_for_the_rest() -> None:
    lines = host_shaping("eth0", 2_000_000)
    assert lines[0] == (
        "qdisc add dev eth0 root handle 1: tbf rate 2000000bit burst 32768 latency 50ms"
    )
    # The bulk FIFO is the one tbf makes itself: 50 ms of the rate plus the bucket.
    assert lines[5] == f"qdisc add dev eth0 parent 10:20 bfifo limit {12_500 + 32_768}"
    assert "prio 0" in lines[2] and "classid 10:10" in lines[2]
    program = lines[6].split('"')[1].split(",")
    assert program[0] == "4" and program[1] == "128 0 0 0"  # four instructions; load the length
    assert program[2] == f"37 1 0 {SPARSE_BYTES}"  # longer: skip to "no match"
    assert lines[6].endswith("classid 10:10")


def test_every_host_knows_every_other_hosts_mac() -> None:
    state = plan(3, "20mbit")
    lines = neighbour_commands(state).splitlines()
    assert lines[0] == "neigh replace 10.77.0.1 lladdr 02:cb:00:00:00:00 dev eth0 nud permanent"
    assert lines[3] == "neigh replace 10.77.0.4 lladdr 02:cb:00:00:00:03 dev eth0 nud permanent"
    assert len(lines) == 4
    # the MACs written are the ones the links get
    ip, _ = hub_commands(state)
    assert any("peer name eth0 address 02:cb:00:00:00:00 netns ctb-srv" in line for line in ip)


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


class BootServer(ThreadingHTTPServer):
    """Answers the firmware with what corral serve's BootService renders for the fixture
    cluster (as if every request came from img01's reserved address)."""

    service: BootService
    paths: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: BootServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        service = self.server.service
        status, body = 200, b""
        try:
            if self.path == "/boot/ipxe":
                body = service.ipxe_entry().encode()
            elif self.path.startswith("/boot/token/"):
                name = self.path.removeprefix("/boot/token/").removesuffix(".cpio.gz")
                body = service.token_cpio(name, IMG01_IP)
            elif self.path.endswith(".ipxe"):
                mac = self.path.removeprefix("/boot/").removesuffix(".ipxe")
                body = service.ipxe_for_mac(mac.replace("-", ":")).encode()
            else:
                status, body = 404, b"not found"
        except CorralError as exc:
            status, body = 403, exc.message.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


IMG01_MAC, IMG01_IP = "52:54:00:00:00:05", "10.0.0.15"


@pytest.fixture
def boot_server(fixture_cluster: None, home: Path) -> Iterator[BootServer]:
    server = BootServer(("127.0.0.1", 0), _Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    settings = dataclasses.replace(db.settings(), server_url=url)
    server.service, server.paths = BootService(settings, db.engine()), []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(server: BootServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _args(server: BootServer, directory: Path, timeout: float = 10.0) -> argparse.Namespace:
    return argparse.Namespace(
        server=_url(server), node="img01", mac=IMG01_MAC, disk="/dev/loop9", dir=directory,
        interface="eth0", timeout=timeout, retry=0.05, agent="stand-in --flag",
    )  # fmt: skip


def test_firmware_boots_what_the_rendered_script_says(
    boot_server: BootServer, tmp_path: Path
) -> None:
    """The agent's command line is the kernel line of the iPXE script corral renders for
    the node, reached as iPXE reaches it (/boot/ipxe chains to the node's own script),
    and its token comes from the script's token initrd."""
    argv = firmware.boot(_args(boot_server, tmp_path / "img01"))
    assert boot_server.paths == [
        "/boot/ipxe",
        "/boot/52-54-00-00-00-05.ipxe",
        "/boot/token/img01.cpio.gz",  # not the ramdisk's own initrd: the host stands in
    ]
    with db.session() as s:
        rendered = BootService(boot_server.service.settings, db.engine()).ipxe_for_mac(IMG01_MAC)
        assert NodeStates(s).check_token("img01", (tmp_path / "img01/token").read_text().strip())
    kernel = next(line for line in rendered.splitlines() if line.startswith("kernel "))
    directory = tmp_path / "img01"
    assert (directory / "cmdline").read_text() == kernel.split(" ", 2)[2] + "\n"
    orders = BootOrders.from_cmdline((directory / "cmdline").read_text())
    assert (orders.mode, orders.agent_exit, orders.node) == ("deploy", "reboot", "img01")
    assert orders.server == _url(boot_server)
    assert (directory / "token").stat().st_mode & 0o777 == 0o600
    assert argv[:2] == ["stand-in", "--flag"]
    assert argv[2:] == [
        "--cmdline", str(directory / "cmdline"), "--token-file", str(directory / "token"),
        "--log-file", str(directory / "agent.log"), "--run-dir", str(directory / "run"),
        "--interface", "eth0", "--disk", "/dev/loop9", "--work-dir", str(directory / "target"),
        "--newroot", str(directory / "newroot"),
        "--exit", "exit",  # a namespace has no machine to reboot
    ]  # fmt: skip


#: /proc/net/snmp's TCP lines as Linux writes them, among the other protocols
SNMP = (
    "Ip: Forwarding DefaultTTL InReceives\n"
    "Ip: 1 64 67559\n"
    "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails "
    "EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n"
    "Tcp: 1 200 120000 -1 1876 1304 185 113 0 67559 58757 9 0 296 0\n"
    "Udp: InDatagrams NoPorts\n"
    "Udp: 12 0\n"
)


def test_tcp_segments_are_read_from_snmp() -> None:
    assert cluster.tcp_segments(SNMP) == (58757, 9)
    with pytest.raises(CorralError, match="no Tcp lines"):
        cluster.tcp_segments("Ip: Forwarding\nIp: 1\n")


def test_queue_drops_are_the_root_qdiscs_of_the_ports_asked() -> None:
    shown = json.dumps(
        [
            {"kind": "tbf", "handle": "8001:", "dev": "p1", "root": True, "drops": 7},
            {"kind": "bfifo", "handle": "8002:", "dev": "p1", "parent": "8001:1", "drops": 7},
            {"kind": "tbf", "handle": "8001:", "dev": "p2", "root": True, "drops": 5},
            {"kind": "tbf", "handle": "8001:", "dev": "r1-core", "root": True, "drops": 100},
            {"kind": "noqueue", "handle": "0:", "dev": "lo", "root": True},
        ]
    )
    assert cluster.qdisc_drops(shown, {"p1", "p2"}) == 12  # the child's are the root's
    assert cluster.qdisc_drops(shown, set()) == 0
    assert cluster.qdisc_drops("", {"p1"}) == 0


def test_the_nodes_congestion_control_is_allowed_in_their_namespaces(tmp_path: Path) -> None:
    # the host's kernel lists (as /proc/sys/net/ipv4 does): it has cubic, allows bbr only
    (tmp_path / "tcp_available_congestion_control").write_text("reno bbr cubic\n")
    loaded: list[str] = []
    allowed = tmp_path / "tcp_allowed_congestion_control"
    allowed.write_text("reno bbr\n")
    assert cluster.allow_congestion_control("cubic", tmp_path, loaded.append)
    assert allowed.read_text() == "reno bbr cubic\n"
    # allowed already: unchanged
    assert cluster.allow_congestion_control("cubic", tmp_path, loaded.append)
    assert allowed.read_text() == "reno bbr cubic\n"
    assert loaded == []  # available: nothing to load
    # a kernel without it, whose module does not load either
    assert not cluster.allow_congestion_control("vegas", tmp_path, loaded.append)
    assert loaded == ["tcp_vegas"]
    assert allowed.read_text() == "reno bbr cubic\n"


def test_firmware_waits_while_the_node_boots_its_disk(
    boot_server: BootServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with db.session() as s:
        NodeStates(s).record("img01", "install-finished", "installed before", "admin")
    assert firmware.main(
        ["--server", _url(boot_server), "--node", "img01", "--mac", IMG01_MAC, "--disk",
         "/dev/loop9", "--dir", str(tmp_path), "--timeout", "0.3", "--retry", "0.05"]
    ) == 1  # fmt: skip
    assert not (tmp_path / "token").exists()
    assert "/boot/token/img01.cpio.gz" not in boot_server.paths
    console = capsys.readouterr().out
    # the same answer is said once, not at every retry
    assert console.count("asking again") == 1, console
    assert "boot failed: nothing to boot after 0.3 s" in console


def test_firmware_refuses_what_ipxe_would_not_run() -> None:
    with pytest.raises(firmware.BootFailed, match="not an iPXE script"):
        firmware.interpret("<html>", "52:54:00:00:00:05", "http://x/")
    with pytest.raises(firmware.BootFailed, match="line 2: imgfetch: not a command"):
        firmware.interpret("#!ipxe\nimgfetch x\n", "52:54:00:00:00:05", "http://x/")
    _, chained = firmware.interpret(
        "#!ipxe\nchain ${net0/mac:hexhyp}.ipxe\n", "52:54:00:00:00:05", "http://x/boot/ipxe"
    )
    assert chained == "http://x/boot/52-54-00-00-00-05.ipxe"
