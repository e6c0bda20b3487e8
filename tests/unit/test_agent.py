"""The node agent (corral.agent) against a fake /proc and /sys, fake busybox commands and
a real HTTP server on 127.0.0.1 that records what it is sent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from corral.agent.cmdline import BootOrders, parse_cmdline
from corral.agent.main import Agent, Paths, Settings, main
from corral.agent.network import NetworkError, read_lease, write_udhcpc_script
from corral.agent.report import Client, Rejected, ReportError

SRC = Path(__file__).resolve().parents[2] / "src"
TOKEN = "s3cret-token"

# --- a recording HTTP server -----------------------------------------------------------


@dataclass
class Recorder:
    url: str
    requests: list[dict[str, object]] = field(default_factory=list)
    #: Statuses to answer, in order; 200 once they run out.
    script: list[int] = field(default_factory=list)
    #: Answer in HTTP/1.1, keeping connections open; how many were opened.
    keep_alive: bool = False
    connections: int = 0


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder(url="")

    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            super().setup()
            recorder.connections += 1
            if recorder.keep_alive:
                self.protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            recorder.requests.append(
                {
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                    "content_type": self.headers.get("Content-Type"),
                    "body": json.loads(body),
                }
            )
            status = recorder.script.pop(0) if recorder.script else 200
            answer = json.dumps({"node": "d5254", "status": status}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# --- a fake machine --------------------------------------------------------------------

CPUINFO = "processor\t: 0\nmodel name\t: QEMU\n\nprocessor\t: 1\nmodel name\t: QEMU\n"
MEMINFO = "MemTotal:        1010000 kB\nMemFree:          900000 kB\n"
ROUTES = "Iface\tDestination\tGateway\tFlags\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_machine(tmp: Path, cmdline: str, *, token: str | None = TOKEN) -> Paths:
    """/proc and /sys of a 2-CPU machine with disks vda (10 GiB), sda, loop0 and sr0, and
    NICs cvt0, cvt1 (with devices) and br-x (a bridge), all under ``tmp``."""
    proc, sysfs = tmp / "proc", tmp / "sys"
    _write(proc / "cmdline", cmdline + "\n")
    _write(proc / "cpuinfo", CPUINFO)
    _write(proc / "meminfo", MEMINFO)
    _write(proc / "sys" / "kernel" / "osrelease", "6.1.0-56-cloud-amd64\n")
    _write(proc / "net" / "route", ROUTES)
    for name, sectors, rotational in (("vda", 20971520, 1), ("sda", 2048, 0), ("loop0", 8, 0)):
        _write(sysfs / "block" / name / "size", f"{sectors}\n")
        _write(sysfs / "block" / name / "queue" / "rotational", f"{rotational}\n")
        _write(sysfs / "block" / name / "removable", "0\n")
    _write(sysfs / "block" / "sda" / "device" / "model", "QEMU HARDDISK   \n")
    _write(sysfs / "block" / "sr0" / "size", "2097151\n")
    for name, mac, carrier in (("cvt0", "52:54:00:AA:00:01", 1), ("cvt1", "52:54:00:aa:00:02", 1)):
        net = sysfs / "class" / "net" / name
        _write(net / "address", mac + "\n")
        _write(net / "carrier", f"{carrier}\n")
        (net / "device").mkdir(parents=True)
    _write(sysfs / "class" / "net" / "br-x" / "address", "02:00:00:00:00:09\n")
    _write(sysfs / "class" / "net" / "lo" / "address", "00:00:00:00:00:00\n")
    if token is not None:
        _write(tmp / "etc" / "node-token", token + "\n")
    return Paths(
        proc=proc,
        sysfs=sysfs,
        token=tmp / "etc" / "node-token",
        log=tmp / "log" / "corral-agent.log",
        run=tmp / "run",
        resolv=tmp / "etc" / "resolv.conf",
    )


FAKE_UDHCPC = """#!/bin/sh
# Fake busybox udhcpc: "leases" 10.9.0.5 on the interface given with -i, through the
# event script given with -s, as the real one does.
echo "$@" >> "$FAKE_LOG"
while [ $# -gt 0 ]; do
  case "$1" in
    -i) iface=$2; shift ;;
    -s) script=$2; shift ;;
  esac
  shift
done
[ "$iface" = "$FAKE_NO_LEASE" ] && exit 1
interface=$iface "$script" deconfig
interface=$iface ip=10.9.0.5 mask=24 router=10.9.0.1 dns="10.9.0.2 10.9.0.3" \\
  domain=lab "$script" bound
"""

FAKE_RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$*" in
  "route del"*) exit 2 ;;  # no such route
esac
"""


@pytest.fixture
def fakebin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """udhcpc, ip and poweroff that record their arguments in ``$FAKE_LOG``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("udhcpc", FAKE_UDHCPC), ("ip", FAKE_RECORDER), ("poweroff", FAKE_RECORDER)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    log = tmp_path / "commands.log"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


class OfflineAgent(Agent):
    """An agent whose NICs have no address yet (the fake NICs do not exist on this host)."""

    def interface_ipv4(self, name: str) -> str | None:
        return None


# --- the command line ------------------------------------------------------------------


def test_parse_cmdline_words_quotes_and_flags() -> None:
    text = 'BOOT_IMAGE=/vmlinuz quiet corral.server=http://10.0.0.1:8080 msg="a b" x= -- init'
    args = parse_cmdline(text)
    assert args["corral.server"] == "http://10.0.0.1:8080"
    assert args["msg"] == "a b"
    assert args["quiet"] == "" and args["x"] == ""
    assert "init" not in args


def test_boot_orders_from_cmdline() -> None:
    orders = BootOrders.from_cmdline(
        "console=ttyS0 corral.server=http://10.88.0.1:8080/ corral.node=n01 ip=dhcp "
        "corral.mode=deploy corral.agent_exit=poweroff BOOTIF=01-52-54-00-AA-00-02"
    )
    assert orders.server == "http://10.88.0.1:8080"
    assert orders.node == "n01"
    assert orders.mode == "deploy"
    assert orders.agent_exit == "poweroff"
    assert orders.boot_mac == "52:54:00:aa:00:02"
    assert not orders.discover


def test_boot_orders_tolerate_missing_and_bad_values() -> None:
    orders = BootOrders.from_cmdline("console=ttyS0 corral.agent_exit=explode BOOTIF=zz")
    assert (orders.server, orders.node, orders.mode, orders.boot_mac) == (None, None, None, None)
    assert orders.agent_exit == "wait"
    assert BootOrders.from_cmdline("").server is None
    assert BootOrders.from_cmdline("corral.discover=1").discover
    assert BootOrders.from_cmdline("corral.discover").discover
    assert not BootOrders.from_cmdline("corral.discover=0").discover


# --- facts -----------------------------------------------------------------------------


def test_facts_from_proc_and_sys(tmp_path: Path) -> None:
    paths = fake_machine(tmp_path, "corral.node=n01")
    facts = OfflineAgent(BootOrders(), paths).facts()
    assert facts.kernel == "6.1.0-56-cloud-amd64"
    assert facts.cpus == 2
    assert facts.memory_mb == 986
    assert [(d.name, d.size_bytes) for d in facts.disks] == [
        ("sda", 2048 * 512),
        ("vda", 10 * 1024**3),
    ]
    assert facts.disks[0].model == "QEMU HARDDISK"
    assert facts.disks[0].rotational is False and facts.disks[1].rotational is True
    assert [(n.name, n.mac, n.carrier) for n in facts.nics] == [
        ("cvt0", "52:54:00:aa:00:01", True),
        ("cvt1", "52:54:00:aa:00:02", True),
    ]
    summary = facts.summary("10.9.0.5", "52:54:00:aa:00:01")
    assert summary == (
        "ip=10.9.0.5 mac=52:54:00:aa:00:01 kernel=6.1.0-56-cloud-amd64 cpus=2 "
        "memory_mb=986 disks=sda:1.0M,vda:10.0G"
    )
    body = facts.discovery("52:54:00:aa:00:01")
    assert body["disks"][1] == {
        "name": "vda",
        "size_bytes": 10 * 1024**3,
        "model": None,
        "rotational": True,
        "removable": False,
    }


def test_facts_of_an_empty_machine(tmp_path: Path) -> None:
    paths = Paths(proc=tmp_path / "none", sysfs=tmp_path / "none")
    facts = Agent(BootOrders(), paths).facts()
    assert facts.cpus >= 1
    assert (facts.memory_mb, facts.disks, facts.nics) == (0, [], [])
    assert facts.kernel == os.uname().release


# --- reports ---------------------------------------------------------------------------


def agent_for(server: Recorder, tmp: Path, **settings: object) -> tuple[OfflineAgent, list[float]]:
    paths = fake_machine(tmp, "")
    orders = BootOrders(server=server.url, node="n 01")
    slept: list[float] = []
    agent = OfflineAgent(orders, paths, Settings(**settings), sleep=slept.append)  # type: ignore[arg-type]
    return agent, slept


def test_report_posts_json_with_the_bearer_token(server: Recorder, tmp_path: Path) -> None:
    agent, slept = agent_for(server, tmp_path)
    assert agent.report("booted", "ip=10.9.0.5")
    assert server.requests == [
        {
            "path": "/api/v1/nodes/n%2001/events",
            "authorization": f"Bearer {TOKEN}",
            "content_type": "application/json",
            "body": {"phase": "booted", "message": "ip=10.9.0.5"},
        }
    ]
    assert slept == []


def test_report_retries_with_backoff(server: Recorder, tmp_path: Path) -> None:
    server.script = [503, 500]
    agent, slept = agent_for(server, tmp_path, backoff=0.5)
    assert agent.report("pre-install", "started")
    assert len(server.requests) == 3
    assert slept == [0.5, 1.0]


def test_report_gives_up_after_five_tries(server: Recorder, tmp_path: Path) -> None:
    server.script = [503] * 10
    agent, slept = agent_for(server, tmp_path)
    assert not agent.report("booted")
    assert len(server.requests) == 5
    assert slept == [1.0, 2.0, 4.0, 8.0]


def test_refused_report_is_not_retried(server: Recorder, tmp_path: Path) -> None:
    server.script = [401]
    agent, slept = agent_for(server, tmp_path)
    assert not agent.report("booted")
    assert len(server.requests) == 1 and slept == []
    server.script.append(404)
    with pytest.raises(Rejected) as info:
        Client(server.url, "t", sleep=slept.append).post("/x", {})
    assert info.value.status == 404


def test_reports_keep_their_connection_and_survive_its_close(server: Recorder) -> None:
    """Reports go over one kept-alive connection; when the server has closed it while
    idle, the next report opens a new one without a retry's back-off."""
    server.keep_alive = True
    slept: list[float] = []
    client = Client(server.url, "t", sleep=slept.append)
    answer = {"node": "d5254", "status": 200}
    try:
        for _ in range(3):
            assert client.post("/p", {}) == answer
        assert len(server.requests) == 3 and server.connections == 1
        client._local.conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server closed it
        assert client.post("/p", {}) == answer
        assert len(server.requests) == 4 and server.connections == 2 and slept == []
    finally:
        client.close()


def test_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    slept: list[float] = []
    client = Client(f"http://127.0.0.1:{port}", None, tries=3, sleep=slept.append)
    with pytest.raises(ReportError, match="failed 3 times"):
        client.post("/api/v1/nodes/x/events", {"phase": "booted"})
    assert slept == [1.0, 2.0]


def test_report_without_server_or_with_a_bad_phase(tmp_path: Path, server: Recorder) -> None:
    paths = fake_machine(tmp_path, "")
    assert not Agent(BootOrders(node="n01"), paths).report("booted")
    agent, _ = agent_for(server, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown phase"):
        agent.report("exploded")
    assert server.requests == []
    with pytest.raises(ReportError, match="bad server URL"):
        Client("ftp://x")


def test_discovery_posts_facts_without_token(server: Recorder, tmp_path: Path) -> None:
    paths = fake_machine(tmp_path, "")
    agent = OfflineAgent(BootOrders(server=server.url, discover=True), paths)
    facts = agent.facts()
    from corral.agent.main import Link

    assert agent.discover(facts, Link("cvt0", "52:54:00:aa:00:01", "10.9.0.5")) == "d5254"
    request = server.requests[0]
    assert request["path"] == "/api/v1/discover"
    assert request["authorization"] is None
    body = request["body"]
    assert isinstance(body, dict)
    assert body["mac"] == "52:54:00:aa:00:01" and body["cpus"] == 2
    assert [d["name"] for d in body["disks"]] == ["sda", "vda"]


# --- the network -----------------------------------------------------------------------


def test_udhcpc_script_configures_and_records_the_lease(tmp_path: Path, fakebin: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    script = write_udhcpc_script(tmp_path / "run dir", resolv)
    env = dict(
        os.environ,
        interface="cvt0",
        ip="10.9.0.5",
        mask="24",
        router="10.9.0.1 10.9.0.254",
        dns="10.9.0.2",
        domain="lab",
    )
    subprocess.run([str(script), "bound"], env=env, check=True)
    assert read_lease(tmp_path / "run dir", "cvt0") == {
        "interface": "cvt0",
        "ip": "10.9.0.5",
        "mask": "24",
        "router": "10.9.0.1 10.9.0.254",
        "dns": "10.9.0.2",
        "domain": "lab",
        "hostname": "",
        "serverid": "",
    }
    assert resolv.read_text() == "search lab\nnameserver 10.9.0.2\n"
    commands = fakebin.read_text().splitlines()
    assert "ip addr add 10.9.0.5/24 dev cvt0" in commands
    assert "ip route add default via 10.9.0.1 dev cvt0" in commands
    subprocess.run([str(script), "deconfig"], env=env, check=True)
    assert read_lease(tmp_path / "run dir", "cvt0") is None


def test_network_up_leases_on_the_boot_nic(tmp_path: Path, fakebin: Path) -> None:
    paths = fake_machine(tmp_path, "")
    orders = BootOrders(node="n01", boot_mac="52:54:00:aa:00:02")
    link = OfflineAgent(orders, paths).network_up()
    assert (link.interface, link.mac, link.ip) == ("cvt1", "52:54:00:aa:00:02", "10.9.0.5")
    commands = fakebin.read_text().splitlines()
    assert "ip link set dev cvt0 up" in commands and "ip link set dev cvt1 up" in commands
    udhcpc = [c for c in commands if c.startswith("-i ")]
    script = paths.run / "udhcpc.sh"
    assert udhcpc == [f"-i cvt1 -q -n -t 10 -s {script} -x hostname:n01"]
    assert "nameserver 10.9.0.3" in paths.resolv.read_text()


def test_network_up_tries_the_next_nic(
    tmp_path: Path, fakebin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = fake_machine(tmp_path, "")
    monkeypatch.setenv("FAKE_NO_LEASE", "cvt0")
    link = OfflineAgent(BootOrders(), paths).network_up()
    assert link.interface == "cvt1"
    monkeypatch.setenv("FAKE_NO_LEASE", "cvt1")
    (paths.sysfs / "class" / "net" / "cvt0" / "carrier").write_text("0\n")
    slept: list[float] = []
    agent = OfflineAgent(BootOrders(), paths, Settings(nic_timeout=0.3), sleep=slept.append)
    with pytest.raises(NetworkError, match="no DHCP lease on cvt1"):
        agent.network_up()


def test_network_up_keeps_a_configured_nic(tmp_path: Path, fakebin: Path) -> None:
    class Configured(Agent):
        def interface_ipv4(self, name: str) -> str | None:
            return "10.1.2.3" if name == "cvt1" else None

    link = Configured(BootOrders(), fake_machine(tmp_path, "")).network_up()
    assert (link.interface, link.ip) == ("cvt1", "10.1.2.3")
    assert not fakebin.exists()  # neither ip nor udhcpc ran


def test_network_up_without_nics(tmp_path: Path) -> None:
    paths = Paths(proc=tmp_path, sysfs=tmp_path, run=tmp_path / "run")
    agent = Agent(BootOrders(), paths, Settings(nic_timeout=0.2), sleep=lambda s: None)
    with pytest.raises(NetworkError, match="no network interface"):
        agent.network_up()


# --- the whole agent -------------------------------------------------------------------


def test_main_reports_booted_then_powers_off(
    server: Recorder, tmp_path: Path, fakebin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmdline = (
        f"console=ttyS0 corral.server={server.url} corral.node=n01 ip=dhcp "
        "corral.agent_exit=poweroff"
    )
    paths = fake_machine(tmp_path, cmdline)
    argv = [
        "--proc",
        str(paths.proc),
        "--sys",
        str(paths.sysfs),
        "--token-file",
        str(paths.token),
        "--log-file",
        str(paths.log),
        "--run-dir",
        str(paths.run),
        "--resolv",
        str(paths.resolv),
    ]
    assert main(argv) == 0
    [request] = server.requests
    body = request["body"]
    assert isinstance(body, dict) and body["phase"] == "booted"
    assert "mac=52:54:00:aa:00:01" in body["message"]
    assert "kernel=6.1.0-56-cloud-amd64 cpus=2 memory_mb=986" in body["message"]
    # The address the server is reached from: loopback here.
    assert body["message"].startswith("ip=127.0.0.1 ")
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert "poweroff -f" in fakebin.read_text().splitlines()
    log = paths.log.read_text()
    assert "reported booted" in log and "powering off" in log
    assert "reported booted" in capsys.readouterr().err


def test_going_down_waits_for_threads_serving_other_nodes() -> None:
    """A relay still serving the next node (a non-daemon thread) is let finish before a
    reboot, but only for so long."""
    from corral.agent.main import serving_others

    release = threading.Event()
    relay = threading.Thread(target=release.wait, args=(10,), daemon=False)
    relay.start()
    threading.Timer(0.2, release.set).start()
    serving_others(5.0)
    assert not relay.is_alive()  # waited for it
    release.clear()
    stuck = threading.Thread(target=release.wait, args=(10,), daemon=False)
    stuck.start()
    try:
        serving_others(0.1)
        assert stuck.is_alive()  # did not wait past the limit
    finally:
        release.set()
        stuck.join()


def test_agent_imports_only_the_standard_library(tmp_path: Path) -> None:
    """The agent runs in the ramdisk without corral's dependencies: check what it loads."""
    code = (
        "import sys, corral.agent.main\n"
        "for name, mod in sorted(sys.modules.items()):\n"
        "    print(name, getattr(mod, '__file__', None) or '-')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stdlib = os.path.dirname(os.__file__)
    for line in out.splitlines():
        name, _, file = line.partition(" ")
        if name == "corral" or name.startswith("corral."):
            assert name == "corral" or name.startswith("corral.agent"), name
        elif file != "-":
            assert file.startswith(stdlib), f"{name} comes from {file}"


def test_python_m_corral_agent_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral.agent", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
    )
    assert "corral.agent_exit" in out.stdout


def test_the_agent_errors_share_one_root_and_install_failures_one_branch() -> None:
    from corral.agent.disk import DiskError, DiskTooSmall
    from corral.agent.errors import AgentError, Cancelled, InstallError, ReceiveError
    from corral.agent.identity import IdentityError
    from corral.agent.run import CommandFailed, Result

    install_failures = [
        InstallError("no disk"),
        DiskError("too small"),
        DiskTooSmall("too small"),
        CommandFailed(Result(("mkfs.ext4",), 1, "", "bad\n"), "making /"),
        ReceiveError("gone"),
        Cancelled(),
        IdentityError("no shadow"),
    ]
    for error in install_failures:
        assert isinstance(error, InstallError), error
    from corral.agent.wire.chain import Closed, Gone, ProtocolError

    others = [
        ReportError("down"),
        Rejected(403, "no"),
        NetworkError("no link"),
        ProtocolError("bad magic"),
        Gone(7),
        Closed(),
    ]
    for other in others:
        assert isinstance(other, AgentError) and not isinstance(other, InstallError), other
