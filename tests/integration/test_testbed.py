"""The virtual cluster for real: namespaces, veths, tbf, loop devices, the inventory,
corral serve in ctb-srv and node firmware asking it for tokens.

The testbed's names are fixed (``ctb-*``: one testbed per machine), so these tests skip
when one is up already rather than take down someone else's, and every test takes its
own down in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.errors import AlreadyExists
from corral.images.ramdisk.contents import KERNEL_TCP_CONGESTION
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.run import pid_alive, run
from corral.testbed import cluster
from corral.testbed.netns import list_namespaces, namespace_pid_map
from tests.conftest import corral

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.name != "posix" or os.geteuid() != 0, reason="needs root for network namespaces"
    ),
]

# Sends N bytes to the first client on port 9000 (in ctb-srv), or receives and prints the
# rate in bit/s (in a node).
TRANSFER = """
import socket, sys, time
if sys.argv[1] == "send":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.77.0.1", 9000)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); left = int(sys.argv[2]); block = b"x" * 65536
    while left > 0:
        left -= c.send(block[: min(left, len(block))])
    c.close()
else:
    s = socket.create_connection(("10.77.0.1", 9000), timeout=30)
    got, start = 0, time.monotonic()
    while data := s.recv(1 << 20):
        got += len(data)
    print(got, got * 8 / (time.monotonic() - start))
"""

# The agent's stand-in: records how it was started, then stays up like an agent. It
# writes its argv under a temporary name and renames it: the test reads the file the
# moment it exists, and once read it empty (a CI run, 2026-12-04).
STAND_IN = """
import json, os, sys, time
path = os.path.join(os.path.dirname(sys.argv[sys.argv.index("--cmdline") + 1]), "stand-in.json")
with open(path + ".tmp", "w") as f:
    json.dump(sys.argv[1:], f)
os.rename(path + ".tmp", path)
time.sleep(600)
"""


def in_ns(namespace: str, *argv: str, timeout: float = 60) -> str:
    return run(["ip", "netns", "exec", namespace, *argv], timeout=timeout).stdout


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def ctb_namespaces() -> list[str]:
    return [n for n in list_namespaces() if n.startswith(cluster.PREFIX)]


@pytest.fixture
def testbed(home: Path) -> Iterator[cluster.Testbed]:
    if ctb_namespaces():
        pytest.skip("a testbed is up on this machine already")
    bed = cluster.Testbed(db.settings())
    try:
        yield bed
    finally:
        cluster.Testbed(db.settings()).down()


def assert_all_gone(bed: cluster.Testbed) -> None:
    assert ctb_namespaces() == []
    assert bed.loop_devices() == []
    assert namespace_pid_map(cluster.PREFIX) == {}
    assert not bed.state_path.exists()
    assert not bed.disks.exists()


def qdiscs(namespace: str, device: str) -> str:
    return run(["tc", "-n", namespace, "qdisc", "show", "dev", device]).stdout


def measure(node: str, size: int) -> float:
    """Download ``size`` bytes from ctb-srv into ``node``; returns bit/s."""
    argv = ["ip", "netns", "exec", "ctb-srv", sys.executable, "-c", TRANSFER, "send", str(size)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as sender:
        try:
            assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
            got, rate = in_ns(f"ctb-{node}", sys.executable, "-c", TRANSFER, "recv").split()
            assert int(got) == size
            return float(rate)
        finally:
            sender.kill()


def test_up_power_down(testbed: cluster.Testbed, home: Path) -> None:
    state = testbed.up(
        5, "20mbit", server_link="200mbit", loss="1%", slow=["tb003=2mbit"], disk_size="64M"
    )
    names = [f"tb00{i}" for i in range(1, 6)]
    assert testbed.node_names == names
    assert state.server_url == "http://10.77.0.1:8080"

    # The topology: namespaces, the bridge without multicast snooping, its ports.
    assert sorted(ctb_namespaces()) == sorted(["ctb-hub", "ctb-srv"] + [f"ctb-{n}" for n in names])
    bridge = json.loads(run(["ip", "-n", "ctb-hub", "-d", "-j", "link", "show", "br0"]).stdout)
    assert bridge[0]["linkinfo"]["info_data"]["mcast_snooping"] == 0
    ports = json.loads(run(["ip", "-n", "ctb-hub", "-j", "link", "show", "master", "br0"]).stdout)
    assert sorted(p["ifname"] for p in ports) == ["s0", "t001", "t002", "t003", "t004", "t005"]
    eth0 = json.loads(run(["ip", "-n", "ctb-tb004", "-j", "addr", "show", "eth0"]).stdout)[0]
    assert eth0["address"] == "02:cb:00:00:00:04"
    assert [a["local"] for a in eth0["addr_info"]] == ["10.77.0.5"]

    # Shaping: download on the hub side (with loss), upload on the node, server egress.
    assert "tbf" in qdiscs("ctb-hub", "t001") and "rate 20Mbit" in qdiscs("ctb-hub", "t001")
    assert "rate 2Mbit" in qdiscs("ctb-hub", "t003")
    assert "clsact" in qdiscs("ctb-hub", "t003")
    filters = run(["tc", "-n", "ctb-hub", "filter", "show", "dev", "t003", "egress"]).stdout
    assert "bpf" in filters and "direct-action" in filters
    assert "rate 2Mbit" in qdiscs("ctb-tb003", "eth0")
    assert "rate 20Mbit" in qdiscs("ctb-tb001", "eth0")
    assert "rate 200Mbit" in qdiscs("ctb-srv", "eth0")

    # A node's TCP is its kernel's (corral's ramdisk: Debian's), the server's the host's.
    host = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    assert testbed.tcp_congestion() == {"server": host, "nodes": KERNEL_TCP_CONGESTION}
    assert in_ns("ctb-tb005", "cat", "/proc/sys/net/ipv4/tcp_congestion_control").strip() == (
        KERNEL_TCP_CONGESTION
    )

    # A node reaches corral serve.
    probe = "import urllib.request as u; print(u.urlopen('http://10.77.0.1:8080/boot/ipxe').status)"
    assert in_ns("ctb-tb005", sys.executable, "-c", probe).strip() == "200"
    # ... and answers the testbed's admin requests, with the home's token (the bench reads
    # the image bytes corral counted so)
    assert "corral_image_bytes_sent" in testbed.server_get("/metrics")

    # The shaped rate holds, loss and all (generous bands: the host's CPU is shared).
    sent_before = testbed.server_egress_bytes()
    segments_before = testbed.server_tcp_segments()
    slow = measure("tb003", 300_000)
    assert 1.0e6 < slow < 3.0e6, f"2mbit link measured {slow / 1e6:.2f} Mbit/s"
    fast = measure("tb001", 2_500_000)
    assert 8e6 < fast < 30e6, f"20mbit link measured {fast / 1e6:.2f} Mbit/s"
    assert testbed.server_egress_bytes() - sent_before >= 2_800_000
    # ... and the server's TCP counted those bytes' segments (of at most 1,448 bytes)
    after = testbed.server_tcp_segments()
    segments, resent = after[0] - segments_before[0], after[1] - segments_before[1]
    assert segments >= 2_800_000 // 1448 and 0 <= resent < segments, (segments, resent)
    # ... and a burst of 300 datagrams of 1,400 bytes at tb003's 2 Mbit/s port is more
    # than that port's queue holds (about 45 KB): the port's drops count them; the
    # server's own queue (200 Mbit/s here) is read too, and never goes back
    drops_before = testbed.queue_drops()
    tb003 = next(n.ip for n in state.nodes if n.name == "tb003")
    blast = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range(300): s.sendto(bytes(1400), ('{tb003}', 9))"
    )
    in_ns("ctb-srv", sys.executable, "-c", blast)
    drops = testbed.queue_drops()
    assert set(drops) == {"to_nodes", "server"}
    assert drops["to_nodes"] - drops_before["to_nodes"] >= 100, (drops_before, drops)
    assert drops["server"] >= drops_before["server"] >= 0

    # The inventory holds the nodes with their loop devices.
    with db.inventory() as inv:
        specs = {s.name: s for s in inv.specs("node", names)}
    for info in state.nodes:
        spec = specs[info.name]
        assert spec.variables["disk"] == info.loop and info.loop.startswith("/dev/loop")
        assert spec.power is not None and spec.power.driver == "testbed"
        assert "power_command" not in spec.variables
        assert spec.install_method == "image" and spec.profiles == []
        assert spec.groups == ["testbed"]
        iface = spec.interfaces[0]
        assert (iface.name, iface.mac, iface.ip, iface.gateway) == ("eth0", info.mac, info.ip, None)
    loops = {d["name"]: d for d in json.loads(run(["losetup", "-J"]).stdout)["loopdevices"]}
    assert loops[state.nodes[0].loop]["back-file"] == str(testbed.disks / "tb001.img")

    # Power: a node that is not armed gets a script that boots its disk; the firmware
    # keeps asking.
    with db.session() as s:
        NodeStates(s).record("tb002", "install-finished", "installed before", "admin")
    agent = [sys.executable, "-c", STAND_IN]
    pid = testbed.power("tb002", "cycle", agent=agent, timeout=60)
    assert pid is not None
    node_dir = testbed.nodes_dir / "tb002"
    console = node_dir / "console.log"
    wait_for("the local boot", lambda: "boots the local disk" in console.read_text())
    assert re.search(
        r"GET http://10\.77\.0\.1:8080/boot/02-cb-00-00-00-02\.ipxe: 200", console.read_text()
    ), console.read_text()
    assert (node_dir / "pid").read_text().strip() == str(pid)
    assert testbed.node_power("tb002") == ("firmware", [pid])
    # Armed, it gets its token and execs the agent (here its stand-in) in its place.
    with db.session() as s:
        NodeStates(s).arm(["tb002"])
    wait_for("the agent", lambda: (node_dir / "stand-in.json").exists())
    args = json.loads((node_dir / "stand-in.json").read_text())
    loop = state.node("tb002").loop
    for flag, value in [("--interface", "eth0"), ("--disk", loop),
                        ("--token-file", str(node_dir / "token")),
                        ("--work-dir", str(node_dir / "target"))]:  # fmt: skip
        assert args[args.index(flag) + 1] == value
    assert len((node_dir / "token").read_text().strip()) > 20
    cmdline = (node_dir / "cmdline").read_text()
    assert "corral.node=tb002 ip=dhcp corral.mode=deploy corral.agent_exit=reboot" in cmdline
    assert args[args.index("--exit") + 1] == "exit"
    assert testbed.node_power("tb002")[1] == [pid]  # exec'd: the same process
    # the node's session yields the CPU to corral serve's (autogroup weighs sessions)
    assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == str(cluster.NODE_NICE)
    assert Path(f"/proc/{state.server_pid}/autogroup").read_text().split()[-1] == "0"
    testbed.power("tb002", "off")
    assert testbed.node_power("tb002") == ("off", [])
    assert not pid_alive(pid)
    assert not (node_dir / "pid").exists()

    # The CLI's view.
    status = corral("testbed", "status", home=home)
    assert status.returncode == 0, status.stderr
    assert re.search(
        r"tb003\s+10\.77\.0\.4\s+02:cb:00:00:00:03\s+/dev/loop\d+\s+2mbit\s+off", status.stdout
    )
    again = corral("testbed", "up", "--nodes", "2", home=home)
    assert again.returncode == 2
    assert "run 'corral testbed down' first" in again.stderr

    # Down, twice; the inventory keeps the nodes.
    server_pid = state.server_pid
    assert server_pid is not None
    report = testbed.down()
    assert report.namespaces == 7 and report.loops == 5
    assert report.kept_nodes == names
    assert not pid_alive(server_pid)
    assert_all_gone(testbed)
    down = corral("testbed", "down", home=home)
    assert down.returncode == 0, down.stderr
    assert "inventory nodes kept: tb[001-005]" in down.stdout
    assert_all_gone(testbed)
    with db.inventory() as inv:
        assert [s.name for s in inv.specs("node")] == names


def test_down_without_state_after_crash(testbed: cluster.Testbed, home: Path) -> None:
    state = testbed.up(3, "50mbit", disk_size="16M")
    testbed.power("tb001", "on", agent=[sys.executable, "-c", STAND_IN], timeout=30)
    assert state.server_pid is not None and pid_alive(state.server_pid)
    testbed.state_path.unlink()  # as if the machine had lost it
    assert testbed.leftovers()  # up would refuse
    down = corral("testbed", "down", "--forget", home=home)
    assert down.returncode == 0, down.stderr
    assert "removed from the inventory: tb[001-003]" in down.stdout
    assert not pid_alive(state.server_pid)
    assert_all_gone(testbed)
    with db.inventory() as inv:
        assert inv.specs("node") == []
        assert not inv.exists("group", "testbed")


def test_failed_up_takes_down_what_it_made(testbed: cluster.Testbed) -> None:
    # Another node owns the address tb002 would get: registering fails after the network
    # and the disks exist.
    added = corral("node", "add", "other", "--ip", "10.77.0.3", home=db.settings().home)
    assert added.returncode == 0, added.stderr
    with pytest.raises(AlreadyExists, match=r"10\.77\.0\.3"):
        testbed.up(3)
    assert_all_gone(testbed)


def agent_takes_testbed_flags() -> bool:
    """The agent learns --interface/--disk/--work-dir in a change of its own."""
    help_text = run([sys.executable, "-m", "corral.agent", "--help"]).stdout
    return all(flag in help_text for flag in ("--interface", "--disk", "--work-dir"))


def test_real_agent_reports_booted(testbed: cluster.Testbed) -> None:
    if not agent_takes_testbed_flags():
        pytest.skip("the agent has no --interface/--disk/--work-dir yet")
    testbed.up(2, disk_size="16M")
    # Power-cycled through the node's power driver (testbed), from inside ctb-srv where
    # corral serve runs, as an administrator would: corral node power.
    cli = str(Path(sys.executable).with_name("corral"))
    powered = run(
        ["ip", "netns", "exec", "ctb-srv", cli, "node", "power", "cycle", "tb001"],
        env={"CORRAL_HOME": str(db.settings().home)},
    )
    assert "tb001  testbed  ok" in powered.stdout, powered.stdout

    def booted() -> bool:
        with db.session() as s:
            return any(e.phase == "booted" for e in NodeStates(s).events("tb001"))

    console = testbed.nodes_dir / "tb001" / "console.log"
    try:
        wait_for("the agent's booted report", booted, timeout=30)
    except AssertionError:
        raise AssertionError(console.read_text()[-3000:]) from None
