"""A virtual cluster in network namespaces: what ``corral testbed up|down|status|power`` does.

Deployments are measured against many nodes with realistic links, without the hardware::

    ctb-srv    eth0 10.77.0.1/24 ─ veth ─ s0   ┐
    ctb-tb001  eth0 10.77.0.2/24 ─ veth ─ t001 ├─ br0 in ctb-hub (no multicast snooping)
    ctb-tb002  eth0 10.77.0.3/24 ─ veth ─ t002 ┘   ...

Every name starts with ``ctb-`` so that ``down`` finds what a crashed ``up`` left, with or
without the state file; only one testbed can exist on a machine. Links are shaped with tbf
where the packets leave: a node's download on the hub's ``tNNN``, its upload on its own
``eth0`` (nodes upload to each other once BitTorrent comes), the server's egress on
``eth0`` in ``ctb-srv`` (whose ``tx_bytes`` is then what the server sent).

Each node has a sparse file attached as a loop device for its disk, is registered in the
inventory (group ``testbed``, install method image, no profile), and is "powered on" by
running :mod:`corral.testbed.firmware` in its namespace, which follows the boot scripts of
the ``corral serve`` that ``up`` starts in ``ctb-srv``, as iPXE would, and execs the real
agent with the command line and token they give.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.config import Settings
from corral.errors import CommandFailed, CorralError, InvalidValue, NotFound, UsageError
from corral.inventory.noderange import expand, is_noderange
from corral.run import pid_alive, run, spawn
from corral.testbed.netns import (
    list_namespaces,
    namespace_pid_map,
    stop_processes,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger("corral.testbed")

PREFIX = "ctb-"
HUB = "ctb-hub"
SERVER_NS = "ctb-srv"
BRIDGE = "br0"
SERVER_PORT = "s0"
NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
SERVER_IP = "10.77.0.1"
MAX_NODES = 250
GROUP = "testbed"
POWER_ACTIONS = ("on", "off", "cycle")
TBF_LATENCY = "50ms"
NODE_NICE = 10  # the nodes' processes yield the host's CPUs to the server's
STATE_VERSION = 1


def power_command(home: Path) -> str:
    """What the deployment manager runs, with {node} filled in, to boot a node into its
    ramdisk. It names the home: the manager runs commands with a minimal environment.
    ``corral.testbed``'s own entry point, not the CLI: a tenth of the start-up time."""
    python, where = shlex.quote(sys.executable), shlex.quote(str(home))
    return f"{python} -m corral.testbed power {{node}} cycle --home {where}"


_NODE = re.compile(r"^tb(\d{3})$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_SIZE = re.compile(r"^(\d+)([kmgt]?)(i?b)?$", re.IGNORECASE)
_LOSS = re.compile(r"^(\d+(?:\.\d+)?)%?$")
_DISK_FILE = re.compile(r"/testbed/disks/tb\d{3}\.img$")
_PROBE = "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2).read()"


class TestbedError(CorralError):
    """The testbed could not be built, changed or taken down."""


class TestbedExists(UsageError):
    """``up`` while (parts of) a testbed exist."""


# --- input ----------------------------------------------------------------------------


def parse_rate(text: str | int) -> int:
    """``20mbit`` -> 20_000_000 bits/s (tc's units, decimal); an int is bits/s already."""
    if isinstance(text, int):
        bps = text
    else:
        m = _RATE.match(text.strip())
        if m is None:
            hint = "use a number and bit, kbit, mbit or gbit, e.g. 20mbit"
            if text.strip().lower().endswith("bps"):
                hint += " (tc reads 'mbps' as megabytes per second)"
            raise InvalidValue(f"bad rate '{text}'", hint)
        bps = round(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if not 8_000 <= bps <= 100 * 10**9:
        raise InvalidValue(f"rate {text} is out of range", "give 8kbit to 100gbit")
    return bps


def format_rate(bps: int) -> str:
    """The shortest exact tc spelling: 20_000_000 -> ``20mbit``."""
    for unit, size in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % size == 0:
            return f"{bps // size}{unit}"
    return f"{bps}bit"


def parse_loss(text: str | float | None) -> float:
    """``1%`` (or ``1``: netem's unit is percent) -> 0.01."""
    if text is None:
        return 0.0
    if isinstance(text, float | int):
        percent = float(text) * 100
    else:
        m = _LOSS.match(text.strip())
        if m is None:
            raise InvalidValue(f"bad loss '{text}'", "give a percentage, e.g. 1% or 0.5%")
        percent = float(m.group(1))
    if not 0 <= percent < 100:
        raise InvalidValue(f"loss {text} is out of range", "give 0% to less than 100%")
    return percent / 100


def parse_size(text: str | int) -> int:
    """``1G`` -> bytes (K, M, G, T are powers of 1024, as truncate reads them)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(text.strip())
        if m is None:
            raise InvalidValue(f"bad size '{text}'", "give e.g. 512M, 1G or 20G")
        size = int(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if not 1024**2 <= size <= 1024**5:
        raise InvalidValue(f"disk size {text} is out of range", "give 1M to 1P")
    return size


def node_name(index: int) -> str:
    return f"tb{index:03d}"


def node_ip(index: int) -> str:
    """Node ``index`` (1-based) at ``10.77.0.<index + 1>``; the server is ``.1``."""
    if not 1 <= index <= MAX_NODES:
        raise InvalidValue(f"node number {index} is out of range 1-{MAX_NODES}")
    return str(NETWORK.network_address + 1 + index)


def node_mac(index: int) -> str:
    """Locally administered, unicast, and readable: node 258 is ``02:cb:00:00:01:02``."""
    return f"02:cb:00:00:{index >> 8:02x}:{index & 0xFF:02x}"


def parse_slow(
    items: Iterable[str] | Mapping[str, str | int], names: Sequence[str]
) -> dict[str, int]:
    """``NODE=RATE`` overrides; NODE is a name, a noderange (``tb[001-004]``) or a number."""
    pairs: list[tuple[str, str | int]] = []
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        for item in items:
            node, sep, rate = item.partition("=")
            if not sep or not node.strip() or not rate.strip():
                raise InvalidValue(f"bad --slow '{item}'", "give NODE=RATE, e.g. tb007=2mbit")
            pairs.append((node.strip(), rate.strip()))
    known = set(names)
    rates: dict[str, int] = {}
    for target, value in pairs:
        bps = parse_rate(value)
        if target.isdigit():
            target = node_name(int(target))
        for name in expand(target) if is_noderange(target) else [target]:
            if name not in known:
                raise InvalidValue(
                    f"--slow names unknown node '{name}'",
                    f"the nodes are {names[0]}..{names[-1]}" if names else None,
                )
            rates[name] = bps
    return rates


# --- state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    name: str
    index: int
    ip: str
    mac: str
    rate: int  # bits/s, both directions of the node's link
    loop: str = ""  # /dev/loopN
    disk: str = ""  # the loop's backing file

    @property
    def namespace(self) -> str:
        return PREFIX + self.name

    @property
    def port(self) -> str:
        """The node's veth end in the hub (at most 15 characters, as every interface name)."""
        return f"t{self.index:03d}"


@dataclass
class TestbedState:
    """What ``up`` built, in ``$CORRAL_HOME/testbed/state.json``."""

    nodes: list[NodeInfo]
    link: int
    server_link: int | None = None
    loss: float = 0.0
    disk_size: int = 1024**3
    http_port: int = 8080
    server_ip: str = SERVER_IP
    network: str = str(NETWORK)
    server_url: str = ""
    server_pid: int | None = None
    created: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def node(self, name: str) -> NodeInfo:
        for info in self.nodes:
            if info.name == name:
                return info
        raise NotFound("testbed node", name, "see 'corral testbed status'")

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(self.network).netmask)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TestbedState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("not a testbed state of this version")
        data["nodes"] = [NodeInfo(**n) for n in data["nodes"]]
        return cls(**data)


def plan(
    nodes: int,
    link: str | int = "20mbit",
    *,
    server_link: str | int | None = None,
    loss: str | float | None = None,
    slow: Iterable[str] | Mapping[str, str | int] = (),
    disk_size: str | int = "1G",
    http_port: int = 8080,
) -> TestbedState:
    """The testbed these options ask for, every input checked; nothing is created."""
    if not 1 <= nodes <= MAX_NODES:
        raise InvalidValue(f"--nodes {nodes} is out of range", f"give 1 to {MAX_NODES}")
    if not 1 <= http_port <= 65535:
        raise InvalidValue(f"--http-port {http_port} is out of range", "give 1 to 65535")
    rate = parse_rate(link)
    names = [node_name(i) for i in range(1, nodes + 1)]
    overrides = parse_slow(slow, names)
    return TestbedState(
        nodes=[
            NodeInfo(name, i, node_ip(i), node_mac(i), overrides.get(name, rate))
            for i, name in enumerate(names, start=1)
        ],
        link=rate,
        server_link=parse_rate(server_link) if server_link is not None else None,
        loss=parse_loss(loss),
        disk_size=parse_size(disk_size),
        http_port=http_port,
    )


# --- shaping --------------------------------------------------------------------------


def tbf(device: str, bps: int) -> str:
    """A tc line that limits ``device``'s egress to ``bps``.

    The bucket holds 4 ms of traffic but at least 32 KiB, enough for the timer's slack at
    high rates without letting slow links burst for long; veth's 64 KiB GSO packets are
    split by tbf itself.
    """
    burst = max(32 * 1024, bps // 8 // 250)
    return f"qdisc add dev {device} root tbf rate {bps}bit burst {burst} latency {TBF_LATENCY}"


def loss_filter(device: str, loss: float) -> list[str]:
    """tc lines that drop each packet leaving ``device`` with probability ``loss``.

    netem would be the usual tool, but kernels built without it exist (this project's test
    machines among them). A classic BPF filter on the clsact egress hook does the same:
    ``ld rand`` (a fresh random u32 per packet), then pass (TC_ACT_OK) or drop
    (TC_ACT_SHOT). It runs before the root qdisc, so dropped packets cost no tbf tokens,
    as netem's loss in front of a tbf child would. Like netem's, the loss is per packet as
    the kernel sees it: a TCP segment that veth carries as one GSO packet is lost whole.
    """
    threshold = min(round(loss * 2**32), 2**32 - 1)
    program = f"4,32 0 0 {2**32 - 0x1000 + 56},53 0 1 {threshold},6 0 0 0,6 0 0 2"
    return [
        f"qdisc add dev {device} clsact",
        f'filter add dev {device} egress bpf da bytecode "{program}"',
    ]


def hub_commands(state: TestbedState) -> tuple[list[str], list[str]]:
    """(``ip -batch`` lines, ``tc -batch`` lines) that build the hub."""
    ip = [
        "link set lo up",
        f"link add {BRIDGE} type bridge mcast_snooping 0 stp_state 0 forward_delay 0",
        f"link set {BRIDGE} addrgenmode none",
        f"link set {BRIDGE} up",
    ]
    tc: list[str] = []
    ports = [(SERVER_PORT, SERVER_NS, None)] + [(n.port, n.namespace, n) for n in state.nodes]
    for port, namespace, node in ports:
        mac = f" address {node.mac}" if node else ""
        ip += [
            f"link add {port} type veth peer name eth0{mac} netns {namespace}",
            f"link set {port} master {BRIDGE}",
            f"link set {port} addrgenmode none",
            f"link set {port} up",
        ]
        if node is not None:
            tc.append(tbf(port, node.rate))
            if state.loss > 0:
                tc += loss_filter(port, state.loss)
    return ip, tc


def endpoint_commands(address: str, prefix: int) -> str:
    """``ip -batch`` lines for a namespace's own end: lo, eth0 with its address.

    No IPv6 link-local address (addrgenmode none): its router solicitations and DAD would
    add traffic to the counters that benchmarks read.
    """
    return (
        "link set lo up\n"
        "link set eth0 addrgenmode none\n"
        f"addr add {address}/{prefix} dev eth0\n"
        "link set eth0 up\n"
    )


# --- the testbed ----------------------------------------------------------------------


@dataclass
class DownReport:
    processes: int = 0
    loops: int = 0
    namespaces: int = 0
    unmounted: int = 0
    #: Inventory nodes of the testbed left in place (``forget`` removes them).
    kept_nodes: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)


class Testbed:
    """The machine's one testbed, kept under ``$CORRAL_HOME/testbed``.

    ``progress`` is called with a short line at each step (the CLI shows it).
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self.progress = progress or (lambda step: None)
        self.root = settings.home / "testbed"
        self.state_path = self.root / "state.json"
        self.disks = self.root / "disks"
        self.nodes_dir = self.root / "nodes"
        self.serve_log = self.root / "serve.log"

    # --- reading ---------------------------------------------------------------------

    @property
    def state(self) -> TestbedState | None:
        """The testbed that is up, or None; a damaged state file counts as none."""
        try:
            return TestbedState.from_json(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable testbed state %s: %s", self.state_path, exc)
            return None

    def require_state(self) -> TestbedState:
        state = self.state
        if state is None:
            raise TestbedError("no testbed is up", "start one with 'corral testbed up --nodes N'")
        return state

    @property
    def node_names(self) -> list[str]:
        state = self.state
        return [n.name for n in state.nodes] if state else []

    def leftovers(self) -> list[str]:
        """What exists of a testbed (its state, namespaces, loop devices), in words."""
        found = []
        if self.state_path.exists():
            found.append(f"state file {self.state_path}")
        namespaces = [n for n in list_namespaces() if n.startswith(PREFIX)]
        if namespaces:
            found.append(f"{len(namespaces)} network namespaces {PREFIX}*")
        loops = self.loop_devices()
        if loops:
            found.append(f"{len(loops)} loop devices")
        return found

    def loop_devices(self) -> list[str]:
        """Loop devices backed by a testbed disk: of this home, or of any home's testbed
        (``.../testbed/disks/tbNNN.img``), which can only be a crashed one."""
        text = run(["losetup", "--json", "--list"]).stdout.strip()
        devices = json.loads(text).get("loopdevices", []) if text else []
        ours = str(self.disks.resolve()) + "/"
        found = []
        for device in devices:
            back = str(device.get("back-file") or "").removesuffix(" (deleted)")
            if back.startswith(ours) or _DISK_FILE.search(back):
                found.append(str(device["name"]))
        return found

    def node_power(self, name: str) -> tuple[str, list[int]]:
        """("off" | "firmware" | "agent" | "on", pids) of a node: what runs in its namespace."""
        pids = namespace_pid_map(PREFIX + name).get(PREFIX + name, [])
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return "off", []
        what = "on"
        for pid in pids:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"corral.testbed.firmware" in cmdline:
                    what = "firmware"
                elif b"corral.agent" in cmdline:
                    return "agent", pids
        return what, pids

    def interface_bytes(self, namespace: str, interface: str = "eth0") -> tuple[int, int]:
        """(rx, tx) byte counters of ``interface`` in ``namespace``."""
        out = run(["ip", "-n", namespace, "-j", "-s", "link", "show", "dev", interface]).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def server_egress_bytes(self) -> int:
        """Bytes the server has sent since ``up`` (its eth0's tx counter)."""
        return self.interface_bytes(SERVER_NS)[1]

    # --- up ------------------------------------------------------------------------------

    def up(
        self,
        nodes: int,
        link: str | int = "20mbit",
        *,
        server_link: str | int | None = None,
        loss: str | float | None = None,
        slow: Iterable[str] | Mapping[str, str | int] = (),
        disk_size: str | int = "1G",
        http_port: int = 8080,
        serve: bool = True,
    ) -> TestbedState:
        """Build the testbed; on any failure, take down what was made and re-raise."""
        state = plan(
            nodes,
            link,
            server_link=server_link,
            loss=loss,
            slow=slow,
            disk_size=disk_size,
            http_port=http_port,
        )
        found = self.leftovers()
        if found:
            raise TestbedExists(
                f"a testbed exists already ({', '.join(found)})", "run 'corral testbed down' first"
            )
        try:
            self._build(state)
            self.progress("registering the nodes in the inventory")
            self.register(state)
            if serve:
                self.progress("starting corral serve in " + SERVER_NS)
                state = self._start_server(state)
                self._save(state)
        except BaseException:
            self.progress("failed: taking down what was made")
            try:
                self.down()
            except Exception:
                log.exception("taking down the half-built testbed failed too")
            raise
        return state

    def _build(self, state: TestbedState) -> None:
        shutil.rmtree(self.nodes_dir, ignore_errors=True)
        self.disks.mkdir(parents=True, exist_ok=True)
        self.nodes_dir.mkdir(parents=True, exist_ok=True)
        namespaces = [HUB, SERVER_NS] + [n.namespace for n in state.nodes]
        self.progress(f"creating {len(namespaces)} network namespaces")
        run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in namespaces))
        # From here on the state file exists, so that status and down see a partial build.
        self._save(state)
        ip, tc = hub_commands(state)
        self.progress(f"linking {len(state.nodes) + 1} veth pairs to the bridge")
        run(["ip", "-n", HUB, "-batch", "-"], input="\n".join(ip) + "\n")
        run(["tc", "-n", HUB, "-batch", "-"], input="\n".join(tc) + "\n")
        self.progress(f"configuring {len(state.nodes)} nodes")
        prefix = ipaddress.IPv4Network(state.network).prefixlen
        jobs: list[tuple[str, str, int | None]] = [(SERVER_NS, state.server_ip, state.server_link)]
        jobs += [(n.namespace, n.ip, n.rate) for n in state.nodes]

        def configure(job: tuple[str, str, int | None]) -> None:
            namespace, address, rate = job
            run(["ip", "-n", namespace, "-batch", "-"], input=endpoint_commands(address, prefix))
            if rate is not None:
                run(["tc", "-n", namespace, *tbf("eth0", rate).split()])

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(configure, jobs))
        self.progress(f"attaching {len(state.nodes)} loop-device disks")
        for i, node in enumerate(state.nodes):
            state.nodes[i] = self._attach_disk(node, state.disk_size)
        self._save(state)

    def _attach_disk(self, node: NodeInfo, size: int) -> NodeInfo:
        path = self.disks / f"{node.name}.img"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: costs no space until written
        finally:
            os.close(fd)
        loop = run(["losetup", "--find", "--show", "--partscan", str(path)]).stdout.strip()
        return replace(node, loop=loop, disk=str(path))

    def register(self, state: TestbedState) -> dict[str, int]:
        """Add or update the nodes in the inventory (idempotent; keeps what an admin set,
        such as profiles, other interfaces and variables); returns counts by outcome."""
        from corral.inventory.clusterfile import apply_cluster
        from corral.inventory.db import transaction
        from corral.inventory.schema import ClusterSpec, GroupSpec, NodeSpec
        from corral.inventory.store import Inventory

        with transaction(self.engine) as session:
            inv = Inventory(session)
            existing = set(inv.names("node"))
            old = {
                s.name: s
                for s in inv.specs("node", [n.name for n in state.nodes if n.name in existing])
            }
            specs = []
            for node in state.nodes:
                data: dict[str, Any] = old[node.name].model_dump() if node.name in old else {}
                eth0 = {"name": "eth0", "mac": node.mac, "ip": node.ip, "netmask": state.netmask}
                others = [i for i in data.get("interfaces", []) if i["name"] != "eth0"]
                groups = [g for g in data.get("groups", []) if g != GROUP] + [GROUP]
                variables = dict(data.get("variables", {}))
                variables.update(disk=node.loop, power_command=power_command(self.settings.home))
                data.update(
                    name=node.name,
                    interfaces=[eth0, *others],
                    groups=groups,
                    variables=variables,
                    install_method="image",
                )
                specs.append(NodeSpec.model_validate(data))
            group = inv.get("group", GROUP) if inv.exists("group", GROUP) else GroupSpec(name=GROUP)
            summary = apply_cluster(inv, ClusterSpec(groups=[group], nodes=specs))
        counts = summary["node"]
        self.progress(
            f"inventory: {counts['created']} nodes created, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged"
        )
        return {str(k): v for k, v in counts.items()}

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from corral.inventory.db import open_engine

            self._engine = open_engine(self.settings.database)
        return self._engine

    def _child_env(self) -> dict[str, str]:
        """What corral's own processes in the namespaces need beyond run()'s allow-list."""
        env = {"CORRAL_HOME": str(self.settings.home)}
        for name in ("CORRAL_CONFIG", "PYTHONPATH"):
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    def _start_detached(self, namespace: str, argv: Sequence[str], output: Path) -> int:
        """Start ``argv`` in ``namespace`` in a session of its own, not as our child (it
        outlives the CLI; nobody has to reap it); returns its pid."""
        with open(output, "ab") as out:
            setsid = spawn(
                ["setsid", "--fork", "ip", "netns", "exec", namespace, *argv],
                env=self._child_env(),
                stdout=out.fileno(),
                stderr=subprocess.STDOUT,
            )
            setsid.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = namespace_pid_map(namespace).get(namespace, [])
            if pids:
                return min(pids)
            time.sleep(0.02)
        raise TestbedError(f"{argv[0]} did not start in {namespace}", f"see {output}")

    def start_server(self) -> TestbedState:
        """Start corral serve again (after it stopped or was stopped), as ``up`` does."""
        return self._start_server(self.require_state())

    def _start_server(self, state: TestbedState) -> TestbedState:
        url = f"http://{state.server_ip}:{state.http_port}"
        port = str(state.http_port)
        argv = [sys.executable, "-m", "corral", "serve", "--address", state.server_ip,
                "--http-port", port, "--tftp-port", "0", "--dhcp", "off"]  # fmt: skip
        pid = self._start_detached(SERVER_NS, argv, self.serve_log)
        state = replace(state, server_url=url, server_pid=pid)
        self._save(state)
        deadline = time.monotonic() + 60
        probe = ["ip", "netns", "exec", SERVER_NS, sys.executable, "-c", _PROBE, url + "/boot/ipxe"]
        while not self._answers(probe):
            if not pid_alive(pid) or time.monotonic() > deadline:
                tail = " | ".join(self.serve_log.read_text(errors="replace").splitlines()[-3:])
                raise TestbedError(
                    f"corral serve did not come up at {url}: {tail}", f"see {self.serve_log}"
                )
            time.sleep(0.2)
        self.progress(f"corral serve answers at {url}")
        if self.settings.server_url not in (Settings.server_url, url):
            log.warning(
                "server_url in corral's config is %s: boot files and plans will name it, "
                "but the testbed's nodes reach corral at %s",
                self.settings.server_url,
                url,
            )
        return state

    @staticmethod
    def _answers(probe: list[str]) -> bool:
        try:
            return run(probe, check=False, timeout=15).returncode == 0
        except CommandFailed:  # the probe timed out
            return False

    def _save(self, state: TestbedState) -> None:
        from corral.files import write_atomic

        write_atomic(self.state_path, state.to_json().encode())

    # --- power ---------------------------------------------------------------------------

    def power(
        self,
        node: str,
        action: str,
        *,
        agent: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> int | None:
        """Power a node off, or (re)boot it: kill what runs in its namespace, then run its
        firmware there, which follows the node's boot script and execs the agent.

        ``agent`` replaces the agent's command (tests use a stand-in); ``timeout`` is how
        long the firmware waits for the server to give it an install to boot. Returns the pid.
        """
        if action not in POWER_ACTIONS:
            raise InvalidValue(f"bad power action '{action}'", f"use {', '.join(POWER_ACTIONS)}")
        state = self.require_state()
        info = state.node(node)
        directory = self.nodes_dir / info.name
        stop_processes(self.node_power(info.name)[1], grace=3.0)
        (directory / "pid").unlink(missing_ok=True)
        if action == "off":
            return None
        if not state.server_url:
            raise TestbedError(
                "the testbed has no server to boot from", "run 'corral testbed up' again"
            )
        directory.mkdir(parents=True, exist_ok=True)
        for stale in ("token", "cmdline"):
            (directory / stale).unlink(missing_ok=True)
        # The nodes run niced: a real server has its CPUs to itself, and here a hundred
        # nodes' agents share the host's few cores with corral serve
        argv = ["nice", "-n", str(NODE_NICE), sys.executable, "-m", "corral.testbed.firmware",
                "--server", state.server_url, "--node", info.name, "--mac", info.mac,
                "--disk", info.loop,
                "--dir", str(directory)]  # fmt: skip
        if timeout is not None:
            argv += ["--timeout", str(timeout)]
        if agent:
            argv += ["--agent", shlex.join(agent)]
        console = directory / "console.log"
        with open(console, "a") as f:
            f.write(f"--- power {action} {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
        pid = self._start_detached(info.namespace, argv, console)
        (directory / "pid").write_text(f"{pid}\n")
        return pid

    # --- down ----------------------------------------------------------------------------

    def down(self, *, forget: bool = False) -> DownReport:
        """Stop everything, detach the disks, delete the namespaces and files.

        Works from what exists, not from the state file, so it also cleans up after a
        crash; safe to run twice. Leaves logs, and the inventory nodes unless ``forget``.
        """
        from corral.images.chroot import cleanup_mounts

        report = DownReport()
        pids = [p for ps in namespace_pid_map(PREFIX).values() for p in ps]
        report.processes = len(pids)
        if pids:
            self.progress(f"stopping {len(pids)} processes")
        survivors = stop_processes(pids)
        if self.root.exists():
            report.unmounted = len(cleanup_mounts(self.root))
        loops = self.loop_devices()
        if loops:
            self.progress(f"detaching {len(loops)} loop devices")
            run(["losetup", "--detach", *loops], check=False)
        report.loops = len(loops)
        namespaces = [n for n in list_namespaces() if n.startswith(PREFIX)]
        if namespaces:
            self.progress(f"deleting {len(namespaces)} network namespaces")
            lines = "".join(f"netns del {ns}\n" for ns in namespaces)
            run(["ip", "-force", "-batch", "-"], input=lines, check=False)
        report.namespaces = len(namespaces)
        shutil.rmtree(self.disks, ignore_errors=True)
        for stale in [*self.nodes_dir.glob("*/token"), *self.nodes_dir.glob("*/pid")]:
            stale.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        report.forgotten, report.kept_nodes = self._inventory_nodes(forget)
        left_ns = [n for n in list_namespaces() if n.startswith(PREFIX)]
        left_loops = self.loop_devices()
        if survivors or left_ns or left_loops:
            raise TestbedError(
                f"testbed only partly down: {len(survivors)} processes, {len(left_ns)} "
                f"namespaces, {len(left_loops)} loop devices remain",
                "see what holds them ('losetup -l', 'ip netns pids NS') and run down again",
            )
        return report

    def _inventory_nodes(self, forget: bool) -> tuple[list[str], list[str]]:
        """(nodes removed, nodes kept) of the testbed's group in the inventory."""
        from corral.inventory.db import transaction
        from corral.inventory.store import Inventory

        try:
            with transaction(self.engine) as session:
                inv = Inventory(session)
                names = [
                    s.name for s in inv.specs("node") if GROUP in s.groups and _NODE.match(s.name)
                ]
                if not forget:
                    return [], names
                if names:
                    inv.remove("node", names)
                users = [s.name for s in inv.specs("node") if GROUP in s.groups]
                if not users and inv.exists("group", GROUP):
                    inv.remove("group", [GROUP])
                return names, []
        except CorralError as exc:
            if forget:
                raise
            log.warning("cannot read the inventory: %s", exc)
            return [], []


def summarize_rates(state: TestbedState) -> str:
    """``20mbit links (tb007: 2mbit)`` for one line of output."""
    odd = [f"{n.name}: {format_rate(n.rate)}" for n in state.nodes if n.rate != state.link]
    text = f"{format_rate(state.link)} links"
    return text + (f" ({', '.join(odd)})" if odd else "")


def loss_text(loss: float) -> str:
    return f"{loss * 100:g}%" if loss else "none"
