"""corral.serve.dhcp against real parts: dnsmasq, busybox udhcpc/udhcpd and a raw PXE client.

Every test gets its own network namespaces, named ``cdh<pid>x<n><role>``: a "server"
namespace with a bridge ``br0`` holding SERVER_IP, a "client" namespace whose ``eth0``
(a veth into the bridge) has a fixed MAC, and for proxy tests an "other" namespace running
a plain DHCP server. Processes are stopped by pid and namespaces deleted in fixture
teardowns, after failures too; namespaces that a killed run left behind are removed at the
start of the next one.

Run as a script (``python test_dhcp.py pxe-client JSON``) this module is the raw PXE client:
it runs inside the client namespace (``ip netns exec``) and prints what it received as JSON.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.errors import CommandFailed, CorralError, InvalidValue
from corral.inventory import db
from corral.inventory.schema import NodeSpec
from corral.run import run
from corral.serve.boot import BootService
from corral.serve.dhcp import (
    DhcpConfig,
    Dnsmasq,
    Reservation,
    backend,
    render_config,
    render_hosts,
)
from corral.serve.http import create_app
from corral.serve.server import dhcp_steps

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.name != "posix" or os.geteuid() != 0, reason="needs root for network namespaces"
    ),
]

PREFIX = f"cdh{os.getpid()}x"
_STALE = re.compile(r"^cdh(\d+)x\d+[sco]$")
_serial = itertools.count()

SERVER_IP = "10.77.0.1"
OTHER_IP = "10.77.0.2"
HTTP_URL = f"http://{SERVER_IP}:8080"
IPXE_URL = f"{HTTP_URL}/boot/ipxe"
MAC1 = "52:54:00:c0:ff:01"
MAC2 = "52:54:00:c0:ff:02"
MAC3 = "52:54:00:c0:ff:03"
UNKNOWN = "52:54:00:c0:ff:99"
NODE1 = Reservation(MAC1, "10.77.0.11", "node01")
NODE2 = Reservation(MAC2, "10.77.0.12", "node02")
NODE3 = Reservation(MAC3, "10.77.0.13", "node03")

BIOS = ["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"]
EFI7 = ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"]
EFI9 = ["-V", "PXEClient:Arch:00009:UNDI:003016", "-x", "0x5d:0009"]
IPXE = [*BIOS, "-x", "0x4d:" + b"iPXE".hex()]  # iPXE's user class (option 77), raw

CLIENT_TIMEOUT = 30  # seconds for one client run


# -- the network -------------------------------------------------------------------------


def sh(*argv: str) -> str:
    return run(argv, timeout=30).stdout


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside ``name`` (by pid), then delete it."""
    out = run(["ip", "netns", "pids", name], check=False, timeout=30).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(["ip", "netns", "delete", name], check=False, timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _remove_stale_namespaces() -> None:
    """Namespaces of earlier runs that were killed before their teardown."""
    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _STALE.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            _delete_namespace(name)


@dataclass
class Net:
    server: str
    client: str
    other: str
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def set_client_mac(self, mac: str) -> None:
        sh("ip", "-n", self.client, "link", "set", "eth0", "down")
        sh("ip", "-n", self.client, "link", "set", "eth0", "address", mac)
        sh("ip", "-n", self.client, "link", "set", "eth0", "up")

    def spawn(self, ns: str, *argv: str) -> subprocess.Popen[bytes]:
        """A helper process in ``ns``, killed at teardown."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    base = f"{PREFIX}{next(_serial)}"
    n = Net(server=base + "s", client=base + "c", other=base + "o", tmp=tmp_path)
    made: list[str] = []
    try:
        for ns in (n.server, n.client, n.other):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        s = ("ip", "-n", n.server)
        sh(*s, "link", "add", "br0", "type", "bridge")
        sh(*s, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        sh(*s, "link", "set", "br0", "up")
        for port, peer_ns, mac in (("vc", n.client, MAC1), ("vo", n.other, None)):
            sh(*s, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", peer_ns)
            sh(*s, "link", "set", port, "master", "br0")
            sh(*s, "link", "set", port, "up")
            if mac:
                sh("ip", "-n", peer_ns, "link", "set", "eth0", "address", mac)
            sh("ip", "-n", peer_ns, "link", "set", "eth0", "up")
        sh("ip", "-n", n.other, "addr", "add", f"{OTHER_IP}/24", "dev", "eth0")
        yield n
    finally:
        for proc in n.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for ns in made:
            _delete_namespace(ns)


def state_dir(tmp: Path) -> Path:
    """A state directory dnsmasq can read after dropping root (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="corral-dhcp-"))
    path.chmod(0o755)
    (tmp / "dnsmasq-state").symlink_to(path)  # for a look after a failure
    return path / "state"


@pytest.fixture
def dnsmasq(net: Net) -> Iterator[Callable[..., Dnsmasq]]:
    """Make Dnsmasq instances in the server namespace; all are stopped at teardown."""
    made: list[Dnsmasq] = []
    dirs: list[Path] = []

    def make(mode: str = "full", **kw: Any) -> Dnsmasq:
        path = state_dir(net.tmp)
        dirs.append(path.parent)
        kw.setdefault("log_dhcp", True)
        cfg = DhcpConfig(mode, "br0", SERVER_IP, HTTP_URL, state_dir=path, **kw)  # type: ignore[arg-type]
        d = Dnsmasq(cfg, netns=net.server)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            pid = d.pid
            d.stop()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)


# -- clients -----------------------------------------------------------------------------

UDHCPC_SCRIPT = """#!/bin/sh
env > "{out}.$1"
"""


def udhcpc(net: Net, *extra: str, mac: str | None = None, tries: int = 4) -> dict[str, str] | None:
    """One DHCP exchange of busybox udhcpc in the client namespace: the environment its
    script saw on ``bound``, or None when it got no lease (after ``tries`` DISCOVERs one
    second apart). It does not configure eth0."""
    if mac:
        net.set_client_mac(mac)
    out = net.tmp / f"udhcpc{next(_serial)}"
    script = out.with_suffix(".sh")
    script.write_text(UDHCPC_SCRIPT.format(out=out))
    script.chmod(0o755)
    argv = [
        "ip",
        "netns",
        "exec",
        net.client,
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        str(tries),
        "-T",
        "1",
        "-s",
        str(script),
        *extra,
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        log, _ = proc.communicate(timeout=CLIENT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    bound = Path(f"{out}.bound")
    if not bound.exists():
        assert proc.returncode != 0, log.decode()
        return None
    env = dict(line.split("=", 1) for line in bound.read_text().splitlines() if "=" in line)
    env["_log"] = log.decode()
    return env


def pxe_client(net: Net, **request: Any) -> dict[str, Any]:
    """Run the raw PXE client (this file as a script) in the client namespace."""
    argv = [
        "ip",
        "netns",
        "exec",
        net.client,
        sys.executable,
        __file__,
        "pxe-client",
        json.dumps(request),
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def log_text(d: Dnsmasq) -> str:
    return d.log_path.read_text(errors="replace") if d.log_path.exists() else ""


def refused(net: Net, d: Dnsmasq, mac: str) -> bool:
    """A BIOS PXE DISCOVER from ``mac`` reaches dnsmasq, which declines to answer."""
    line = f"DHCPDISCOVER(br0) {mac} no address available"
    before = log_text(d).count(line)
    return udhcpc(net, *BIOS, mac=mac, tries=2) is None and log_text(d).count(line) > before


# -- rendering and validation ------------------------------------------------------------


def test_render_config_modes(tmp_path: Path) -> None:
    full = DhcpConfig(
        "full",
        "br0",
        SERVER_IP,
        HTTP_URL,
        range=("10.77.0.100", "10.77.0.200"),
        router="10.77.0.254",
        dns=["10.77.0.53"],
        state_dir=tmp_path,
    )
    text = render_config(full)
    assert text == render_config(full)
    lines = text.splitlines()
    for line in (
        "port=0",
        "interface=br0",
        "bind-interfaces",
        "keep-in-foreground",
        "dhcp-authoritative",
        "dhcp-range=10.77.0.100,10.77.0.200,255.255.255.0,1h",
        "dhcp-option=option:router,10.77.0.254",
        "dhcp-option=option:dns-server,10.77.0.53",
        f"dhcp-leasefile={tmp_path}/dnsmasq.leases",
        f"dhcp-hostsfile={tmp_path}/dhcp-hosts",
        f"dhcp-boot=tag:bios,tag:!ipxe,undionly.kpxe,,{SERVER_IP}",
        f"dhcp-boot=tag:efi64,tag:!ipxe,ipxe.efi,,{SERVER_IP}",
    ):
        assert line in lines
    # The last matching dhcp-boot wins: iPXE over the arch loaders, and a loader named in
    # a machine's reservation over everything.
    boots = [line for line in lines if line.startswith("dhcp-boot=")]
    assert boots[-3:] == [
        f"dhcp-boot=tag:ipxe,{IPXE_URL},,{SERVER_IP}",
        f"dhcp-boot=tag:pxelinux,pxelinux.0,,{SERVER_IP}",
        f"dhcp-boot=tag:grub,grubnetx64.efi,,{SERVER_IP}",
    ]
    assert not any(x in text for x in ("enable-tftp", "tftp-root", "pxe-service"))
    assert "log-dhcp" in lines  # always: corral reads the boot file of each answer

    static = render_config(DhcpConfig("full", "br0", SERVER_IP, HTTP_URL, state_dir=tmp_path))
    assert "dhcp-range=10.77.0.0,static,255.255.255.0,1h" in static.splitlines()
    assert "dhcp-option=option:router" in static.splitlines()  # i.e. send no router

    proxy = render_config(DhcpConfig("proxy", "br0", SERVER_IP, HTTP_URL, state_dir=tmp_path))
    plines = proxy.splitlines()
    assert "dhcp-range=10.77.0.0,proxy,255.255.255.0" in plines
    assert "dhcp-authoritative" not in proxy and "dhcp-option" not in proxy
    assert sum(line.startswith("pxe-service=tag:!ipxe,") for line in plines) == 3
    assert [x for x in plines if x.startswith("dhcp-boot=")][-3] == (
        f"dhcp-boot=tag:ipxe,{IPXE_URL},,{SERVER_IP}"
    )


def test_render_hosts_is_sorted_and_checked() -> None:
    shouted = Reservation(MAC1.upper().replace(":", "-"), NODE1.ip, "node01")
    assert render_hosts([NODE2, shouted]) == f"{MAC1},10.77.0.11,node01\n{MAC2},10.77.0.12,node02\n"
    assert render_hosts([]) == ""
    with pytest.raises(InvalidValue, match=re.escape("share 10.77.0.11")):
        render_hosts([NODE1, Reservation(MAC2, NODE1.ip, "other")])
    with pytest.raises(InvalidValue, match="share"):
        render_hosts([NODE1, Reservation(MAC1, "10.77.0.99", "other")])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "relay"}, "mode"),
        ({"interface": "br0,eth1"}, "interface"),
        ({"server_ip": "10.77.0.300"}, "server_ip"),
        ({"http_url": "ftp://x"}, "http_url"),
        ({"http_url": "http://a,b"}, "http_url"),
        ({"range": ("10.77.0.200", "10.77.0.100")}, "range"),
        ({"range": ("10.77.0.100", "10.78.0.100")}, "range"),
        ({"mode": "proxy", "range": ("10.77.0.100", "10.77.0.200")}, "proxy"),
        ({"netmask": "255.0.255.0"}, "netmask"),
        ({"dns": ["x"]}, "dns"),
        ({"lease_time": "1 h"}, "lease_time"),
        ({"state_dir": Path("/tmp/a b")}, "state_dir"),
    ],
)
def test_config_rejects_bad_values(kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "mode": "full",
        "interface": "br0",
        "server_ip": SERVER_IP,
        "http_url": HTTP_URL,
        "state_dir": Path("/tmp/x"),
    }
    args.update(kw)
    with pytest.raises(InvalidValue, match=match):
        DhcpConfig(**args)


def test_reservation_rejects_bad_values() -> None:
    with pytest.raises(InvalidValue, match="mac"):
        Reservation("52:54:00:00:00", "10.0.0.1", "n1")
    with pytest.raises(InvalidValue, match="ip"):
        Reservation(MAC1, "10.0.0", "n1")
    with pytest.raises(InvalidValue, match="hostname"):
        Reservation(MAC1, "10.0.0.1", "n1.example.org")


# -- full mode ---------------------------------------------------------------------------


def test_reserved_mac_gets_its_address_and_the_loader_for_its_arch(
    net: Net, dnsmasq: Callable[..., Dnsmasq]
) -> None:
    d = dnsmasq("full")
    d.start([NODE1])
    assert d.running and d.pid
    for extra, loader in (
        (BIOS, "undionly.kpxe"),
        (EFI7, "ipxe.efi"),
        (EFI9, "ipxe.efi"),
        (IPXE, IPXE_URL),
        ([*EFI7, "-x", "0x4d:69505845"], IPXE_URL),
    ):
        env = udhcpc(net, *extra, mac=MAC1)
        assert env is not None, log_text(d)
        assert env["ip"] == NODE1.ip
        assert env["serverid"] == SERVER_IP
        assert env.get("boot_file") == loader, (extra, env)
        assert env.get("siaddr") == SERVER_IP
        assert env.get("hostname") == "node01"
        assert "router" not in env  # no router configured: none offered
    plain = udhcpc(net)  # no architecture: a booted OS, gets no boot file
    assert plain is not None and plain["ip"] == NODE1.ip and "boot_file" not in plain
    # No range: an unknown machine gets no answer at all.
    assert refused(net, d, UNKNOWN)


def test_range_serves_unknown_machines(net: Net, dnsmasq: Callable[..., Dnsmasq]) -> None:
    d = dnsmasq(
        "full",
        range=("10.77.0.100", "10.77.0.120"),
        router="10.77.0.254",
        dns=["10.77.0.53", "10.77.0.54"],
        lease_time="10m",
    )
    d.start([NODE1])
    env = udhcpc(net, *EFI7, mac=UNKNOWN)
    assert env is not None, log_text(d)
    assert 100 <= int(env["ip"].rsplit(".", 1)[1]) <= 120
    assert env["boot_file"] == "ipxe.efi"
    assert env["router"] == "10.77.0.254"
    assert env["dns"].split() == ["10.77.0.53", "10.77.0.54"]
    assert env["lease"] == "600"
    env = udhcpc(net, *BIOS, mac=MAC1)
    assert env is not None and env["ip"] == NODE1.ip  # reserved, outside the range


def test_reload_rereads_the_hosts_file_on_sighup_but_not_the_main_config(
    net: Net, dnsmasq: Callable[..., Dnsmasq]
) -> None:
    d = dnsmasq("full")
    d.start([NODE1])
    pid = d.pid
    assert pid is not None
    assert refused(net, d, MAC2)

    # A reservation added to the main configuration is not seen after SIGHUP ...
    with d.conf_path.open("a") as f:
        f.write(f"dhcp-host={MAC2},{NODE2.ip},{NODE2.hostname}\n")
    reads = log_text(d).count(f"read {d.hosts_path}\n")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while log_text(d).count(f"read {d.hosts_path}\n") == reads:
        assert time.monotonic() < deadline, "dnsmasq did not handle SIGHUP"
        time.sleep(0.05)
    assert refused(net, d, MAC2)

    # ... one in the hosts file is: reload() rewrites it and sends SIGHUP.
    assert d.reload([NODE1, NODE2, NODE3]) is True
    assert d.pid == pid and d.restarts == 0
    for node in (NODE2, NODE3):
        env = udhcpc(net, *BIOS, mac=node.mac)
        assert env is not None, log_text(d)
        assert (env["ip"], env["boot_file"]) == (node.ip, "undionly.kpxe")
    assert d.hosts_path.read_text().splitlines()[1] == f"{MAC2},{NODE2.ip},node02"

    # Unchanged reservations: no SIGHUP (dnsmasq would log another read).
    reads = log_text(d).count(f"read {d.hosts_path}\n")
    assert d.reload([NODE3, NODE2, NODE1]) is False
    time.sleep(0.3)
    assert log_text(d).count(f"read {d.hosts_path}\n") == reads

    # Removing a reservation takes effect too (its lease stays until it expires).
    assert d.reload([NODE1]) is True
    assert d.pid == pid
    assert refused(net, d, MAC3)


def test_check_restarts_a_dead_dnsmasq(
    net: Net, dnsmasq: Callable[..., Dnsmasq], caplog: pytest.LogCaptureFixture
) -> None:
    d = dnsmasq("full")
    d.start([NODE1])
    assert d.check() is False
    old = d.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while d.running:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert d.check() is True
    assert d.running and d.pid not in (None, old) and d.restarts == 1
    assert "killed by signal 9" in caplog.text
    env = udhcpc(net, *BIOS, mac=MAC1)
    assert env is not None and env["ip"] == NODE1.ip
    # reload() on a dead dnsmasq restarts it with the new reservations.
    os.kill(d.pid or 0, signal.SIGKILL)
    while d.running:
        time.sleep(0.02)
    assert d.reload([NODE1, NODE2]) is True
    assert d.running and d.restarts == 2
    env = udhcpc(net, *BIOS, mac=MAC2)
    assert env is not None and env["ip"] == NODE2.ip


def test_stop_ends_the_process(net: Net, dnsmasq: Callable[..., Dnsmasq]) -> None:
    d = dnsmasq("full")
    with d:
        d.start([])
        pid = d.pid
        assert pid is not None
        with pytest.raises(CorralError, match="already running"):
            d.start([])
    assert not d.running and d.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "exiting on receipt of SIGTERM" in log_text(d)
    d.stop()  # idempotent
    assert d.check() is False  # stopped on purpose: not restarted
    with pytest.raises(CorralError, match="not started"):
        d.reload([NODE1])


def test_start_fails_clearly_when_port_67_is_taken(
    net: Net, dnsmasq: Callable[..., Dnsmasq]
) -> None:
    holder = net.spawn(
        net.server,
        sys.executable,
        "-c",
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0', 67))\n"
        "time.sleep(60)\n",
    )
    deadline = time.monotonic() + 10
    while ":67 " not in sh("ip", "netns", "exec", net.server, "ss", "-uln"):
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    d = dnsmasq("full")
    with pytest.raises(CommandFailed, match="Address already in use") as info:
        d.start([NODE1])
    assert info.value.returncode == 2
    assert info.value.hint and "port 67" in info.value.hint
    assert not d.running


def test_start_fails_clearly_on_a_missing_interface(tmp_path: Path) -> None:
    path = state_dir(tmp_path)
    try:
        cfg = DhcpConfig("full", "cdhnope0", SERVER_IP, HTTP_URL, state_dir=path)
        d = Dnsmasq(cfg)
        with pytest.raises(CommandFailed, match="cdhnope0"):
            d.start([])
        assert not d.running
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def test_unreadable_state_dir_is_reported(net: Net, tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    d = backend(
        DhcpConfig("full", "br0", SERVER_IP, HTTP_URL, state_dir=hidden / "dhcp"), netns=net.server
    )
    try:
        with pytest.raises(CorralError, match="cannot read") as info:
            d.start([NODE1])
        assert "world-readable" in (info.value.hint or "")
        assert not d.running
    finally:
        d.stop()


# -- proxy mode --------------------------------------------------------------------------

UDHCPD_CONF = """start 10.77.0.150
end 10.77.0.160
interface eth0
lease_file {leases}
max_leases 10
option subnet 255.255.255.0
"""


def start_udhcpd(net: Net) -> None:
    """busybox udhcpd in the "other" namespace: the network's plain DHCP server."""
    conf = net.tmp / "udhcpd.conf"
    conf.write_text(UDHCPD_CONF.format(leases=net.tmp / "udhcpd.leases"))
    proc = net.spawn(net.other, "busybox", "udhcpd", "-f", "-a", "100", str(conf))
    deadline = time.monotonic() + 10
    while ":67 " not in sh("ip", "netns", "exec", net.other, "ss", "-uln"):
        assert proc.poll() is None and time.monotonic() < deadline, "udhcpd did not start"
        time.sleep(0.05)


def split(offers: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the address offer of the other server, corral's proxy offer)."""
    assert len(offers) == 2, offers
    address = [o for o in offers if o["yiaddr"] != "0.0.0.0"]
    proxy = [o for o in offers if o["yiaddr"] == "0.0.0.0"]
    assert len(address) == 1 and len(proxy) == 1, offers
    return address[0], proxy[0]


def test_proxy_mode_answers_only_the_boot_part(net: Net, dnsmasq: Callable[..., Dnsmasq]) -> None:
    start_udhcpd(net)
    d = dnsmasq("proxy")
    d.start([])

    # An ordinary client (no PXE) gets its address from the other server; corral is silent.
    env = udhcpc(net, mac=MAC1)
    assert env is not None
    assert env["serverid"] == OTHER_IP and env["ip"].startswith("10.77.0.15")
    assert "boot_file" not in env

    # A BIOS PXE client: the address from the other server, the boot file from corral.
    got = pxe_client(net, arch=0, want=2, request=True)
    address, proxy = split(got["offers"])
    assert address["options"]["54"] == OTHER_IP and address["file"] == ""
    assert got["ack"]["options"]["54"] == OTHER_IP
    assert got["ack"]["yiaddr"] == address["yiaddr"]
    assert proxy["options"]["54"] == SERVER_IP
    assert proxy["options"]["60"] == "PXEClient"
    assert (proxy["siaddr"], proxy["file"]) == (SERVER_IP, "undionly.kpxe")
    assert "43" in proxy["options"]  # the PXE menu: one item, corral's
    assert "corral iPXE (BIOS)" in proxy["options"]["43"]
    assert "undionly.kpxe" in log_text(d)

    # A UEFI client is sent to port 4011 and gets its loader there.
    for arch in (7, 9):
        got = pxe_client(net, arch=arch, want=2, request=True, boot_server=True)
        address, proxy = split(got["offers"])
        assert got["ack"]["options"]["54"] == OTHER_IP
        assert (proxy["siaddr"], proxy["file"]) == (SERVER_IP, "")
        pxe = got["pxe_ack"]
        assert pxe is not None, log_text(d)
        assert pxe["from"] == [SERVER_IP, 4011]
        assert (pxe["siaddr"], pxe["file"]) == (SERVER_IP, "ipxe.efi")

    # The BIOS client's boot server request on 4011 (PXE boot item from the menu).
    got = pxe_client(net, arch=0, want=2, request=True, boot_server=True)
    assert got["pxe_ack"] is not None and got["pxe_ack"]["file"] == "undionly.kpxe"

    # iPXE (user class "iPXE"), BIOS or UEFI build: the HTTP URL, no PXE menu.
    for arch in (0, 7):
        got = pxe_client(net, arch=arch, user_class="iPXE", want=2)
        _, proxy = split(got["offers"])
        assert (proxy["siaddr"], proxy["file"]) == (SERVER_IP, IPXE_URL)
        assert "corral iPXE" not in proxy["options"].get("43", "")


# -- the raw PXE client (run in the client namespace) -------------------------------------

_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
_COOKIE = b"\x63\x82\x53\x63"


def _packet(
    kind: int, mac: bytes, xid: int, options: list[tuple[int, bytes]], ciaddr: str = "0.0.0.0"
) -> bytes:
    header = _BOOTP.pack(
        1,
        1,
        6,
        0,
        xid,
        0,
        0x8000 if ciaddr == "0.0.0.0" else 0,
        socket.inet_aton(ciaddr),
        bytes(4),
        bytes(4),
        bytes(4),
        mac.ljust(16, b"\0"),
        b"",
        b"",
    )
    body = b"".join(bytes([code, len(v)]) + v for code, v in [(53, bytes([kind])), *options])
    return header + _COOKIE + body + b"\xff"


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("latin-1")


def _parse(data: bytes) -> dict[str, Any]:
    fields = _BOOTP.unpack_from(data)
    options: dict[int, bytes] = {}
    i = _BOOTP.size + len(_COOKIE)
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, size = data[i], data[i + 1]
        options[code] = options.get(code, b"") + data[i + 2 : i + 2 + size]
        i += 2 + size
    shown: dict[str, str] = {}
    for code, value in options.items():
        if code in (54, 1, 3):
            shown[str(code)] = socket.inet_ntoa(value[:4])
        elif code in (53,):
            shown[str(code)] = str(value[0])
        elif code in (60, 43, 66, 67):
            shown[str(code)] = value.decode("latin-1")
        else:
            shown[str(code)] = value.hex()
    return {
        "op": fields[0],
        "xid": fields[4],
        "yiaddr": socket.inet_ntoa(fields[8]),
        "siaddr": socket.inet_ntoa(fields[9]),
        "sname": _text(fields[12]),
        "file": _text(fields[13]),
        "options": shown,
        "raw43": options.get(43, b"").hex(),
    }


def _boot_item(raw43: bytes) -> bytes:
    """Option 43 of a boot server request: the first menu item (suboption 9) of the offer."""
    i = 0
    while i + 1 < len(raw43) and raw43[i] != 255:
        code, size = raw43[i], raw43[i + 1]
        if code == 9 and size >= 2:
            return bytes([71, 4]) + raw43[i + 2 : i + 4] + b"\0\0" + b"\xff"
        i += 2 + size
    return b""


def _raw_pxe_client(request: dict[str, Any]) -> dict[str, Any]:
    """DISCOVER as a PXE ROM (options 60, 93, 94, 97, maybe 77); collect offers; optionally
    REQUEST the address offer (DORA) and ask the proxy's boot server on port 4011."""
    iface = request.get("iface", "eth0")
    arch = int(request["arch"])
    mac = bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().replace(":", ""))
    options = [
        (93, struct.pack("!H", arch)),
        (94, b"\x01\x02\x01"),
        (60, f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode()),
        (97, b"\0" + bytes(range(16))),
        (55, bytes([1, 3, 43, 54, 60, 66, 67])),
    ]
    if request.get("user_class"):
        options.append((77, request["user_class"].encode()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    sock.bind(("0.0.0.0", 68))
    xid = int.from_bytes(os.urandom(4), "big")

    def receive(want: int, seconds: float, kind: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while len(got) < want and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, source = sock.recvfrom(4096)
            except TimeoutError:
                break
            reply = _parse(data)
            if reply["op"] == 2 and reply["xid"] == xid and reply["options"].get("53") == str(kind):
                reply["from"] = list(source)
                got.append(reply)
        return got

    result: dict[str, Any] = {"ack": None, "pxe_ack": None}
    sock.sendto(_packet(1, mac, xid, options), ("255.255.255.255", 67))
    offers = receive(int(request.get("want", 2)), float(request.get("wait", 6)), 2)
    result["offers"] = offers
    address = next((o for o in offers if o["yiaddr"] != "0.0.0.0"), None)
    proxy = next((o for o in offers if o["yiaddr"] == "0.0.0.0"), None)
    if request.get("request") and address:
        server = socket.inet_aton(address["options"]["54"])
        req = [(50, socket.inet_aton(address["yiaddr"])), (54, server), *options]
        sock.sendto(_packet(3, mac, xid, req), ("255.255.255.255", 67))
        acks = receive(1, 6, 5)
        result["ack"] = acks[0] if acks else None
    if request.get("boot_server") and result["ack"] and proxy:
        ip = result["ack"]["yiaddr"]
        subprocess.run(["ip", "addr", "add", f"{ip}/24", "dev", iface], check=True)
        try:
            server_ip = proxy["siaddr"]
            if server_ip == "0.0.0.0":
                server_ip = proxy["options"]["54"]
            item = _boot_item(bytes.fromhex(proxy["raw43"]))
            extra = [(43, item)] if item else []
            sock.sendto(_packet(3, mac, xid, [*options, *extra], ciaddr=ip), (server_ip, 4011))
            acks = receive(1, 6, 5)
            result["pxe_ack"] = acks[0] if acks else None
        finally:
            subprocess.run(["ip", "addr", "del", f"{ip}/24", "dev", iface], check=False)
    sock.close()
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "pxe-client":
        print(json.dumps(_raw_pxe_client(json.loads(sys.argv[2]))))
    else:
        sys.exit(f"usage: {sys.argv[0]} pxe-client JSON")


def test_hosts_file_tags_machines_with_another_loader() -> None:
    text = render_hosts(
        [
            Reservation("52:54:00:00:00:02", "10.77.0.12", "b", loader="pxelinux"),
            Reservation("52:54:00:00:00:01", "10.77.0.11", "a"),
        ]
    )
    assert text == "52:54:00:00:00:01,10.77.0.11,a\n52:54:00:00:00:02,set:pxelinux,10.77.0.12,b\n"
    with pytest.raises(InvalidValue, match="loader"):
        Reservation("52:54:00:00:00:03", "10.77.0.13", "c", loader="floppy")


# -- boot steps ----------------------------------------------------------------------------


@pytest.fixture
def recorder(home: Path, settings: Settings) -> Iterator[BootService]:
    """corral's boot service on a fresh home holding node01 (MAC1), with its boot-step
    writer running, as corral serve runs it."""
    with db.inventory() as inv:
        iface = {"mac": MAC1, "ip": NODE1.ip}
        inv.add("node", [NodeSpec(name="node01", interfaces=[iface])])
    service = BootService(settings, db.engine())
    service.steps.start()
    try:
        yield service
    finally:
        service.steps.stop()


def wait_for_events(
    service: BootService, count: int, node: str | None = "node01"
) -> list[tuple[str | None, str | None, str, str]]:
    """(node, mac, phase, message) of the stored events through the API, once there are
    ``count`` (node None: every event, unknown machines' too)."""
    query = f"?node={node}" if node else ""
    with TestClient(create_app(service, "admin-secret")) as api:
        deadline = time.monotonic() + 15
        while True:
            answer = api.get(
                f"/api/v1/events{query}", headers={"Authorization": "Bearer admin-secret"}
            )
            assert answer.status_code == 200, answer.text
            got = [(e["node"], e["mac"], e["phase"], e["message"]) for e in answer.json()]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


def test_network_boot_dhcp_is_recorded_on_the_node(
    net: Net, dnsmasq: Callable[..., Dnsmasq], recorder: BootService
) -> None:
    d = dnsmasq("full", log_dhcp=False)
    d.on_answer = dhcp_steps(recorder.steps)
    d.start([NODE1])
    assert udhcpc(net, *BIOS, mac=MAC1) is not None  # the PXE ROM
    assert udhcpc(net, mac=MAC1) is not None  # an operating system: no boot step
    assert udhcpc(net, *IPXE, mac=MAC1) is not None  # iPXE, loaded
    assert wait_for_events(recorder, 4) == [
        ("node01", None, "dhcp", f"{NODE1.ip} offered"),
        ("node01", None, "dhcp", f"{NODE1.ip} acknowledged (undionly.kpxe)"),
        ("node01", None, "dhcp", f"{NODE1.ip} offered"),
        ("node01", None, "dhcp", f"{NODE1.ip} acknowledged ({IPXE_URL})"),
    ]
    # dnsmasq.log keeps the answers, without log-dhcp's per-packet details
    text = log_text(d)
    assert f"DHCPACK(br0) {NODE1.ip} {MAC1} node01" in text
    assert "bootfile name" not in text and "sent size" not in text


def test_unknown_machines_are_recorded_with_their_mac_once_a_minute(
    net: Net, dnsmasq: Callable[..., Dnsmasq], recorder: BootService
) -> None:
    d = dnsmasq("full")
    d.on_answer = dhcp_steps(recorder.steps)
    d.start([NODE1])
    assert refused(net, d, UNKNOWN)  # two DISCOVERs, then again: stored once
    assert refused(net, d, UNKNOWN)
    time.sleep(1)
    assert wait_for_events(recorder, 1, node=None) == [
        (None, UNKNOWN, "dhcp", "asked for an address: no address available")
    ]


def test_proxy_mode_records_the_proxy_offer_and_the_boot_server(
    net: Net, dnsmasq: Callable[..., Dnsmasq], recorder: BootService
) -> None:
    start_udhcpd(net)
    d = dnsmasq("proxy")
    d.on_answer = dhcp_steps(recorder.steps)
    d.start([])
    got = pxe_client(net, arch=7, want=2, request=True, boot_server=True)
    assert got["pxe_ack"] is not None, log_text(d)
    events = wait_for_events(recorder, 2)
    assert events == [  # the proxy offer, then the boot server's answer on port 4011
        ("node01", None, "dhcp", "proxy offer, boot file from port 4011"),
        ("node01", None, "dhcp", "proxy offer (ipxe.efi)"),
    ]
