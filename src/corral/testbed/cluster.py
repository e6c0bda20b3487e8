"""A virtual cluster in network namespaces: what ``corral testbed up|down|status|power`` does.

Deployments are measured against many nodes with realistic links, without the hardware::

    ctb-srv    eth0 10.77.0.1/24 ─ veth ─ s0   ┐
    ctb-tb001  eth0 10.77.0.2/24 ─ veth ─ t001 ├─ br0 in ctb-hub (no multicast snooping)
    ctb-tb002  eth0 10.77.0.3/24 ─ veth ─ t002 ┘   ...

With ``racks``, the nodes hang on a bridge per rack instead, each joined to ``br0`` by a
shaped uplink (all in ``ctb-hub``; see :mod:`corral.testbed.links`)::

    ctb-srv    eth0 ─ s0 ─ br0 ─┬─ r1-core ═ r1-up ─ br-r1 ─┬─ t001 ─ eth0 ctb-tb001
                                │                         └─ t002 ─ eth0 ctb-tb002
                                └─ r2-core ═ r2-up ─ br-r2 ─── ...

Every name starts with ``ctb-`` so that ``down`` finds what a crashed ``up`` left, with or
without the state file; only one testbed can exist on a machine. Links are shaped with tbf
where the packets leave: a node's download on the hub's ``tNNN``, its upload on its own
``eth0`` (nodes upload to each other once BitTorrent comes), the server's egress on
``eth0`` in ``ctb-srv`` (whose ``tx_bytes`` is then what the server sent); a host's own
end lets its small packets (handshakes, ACKs) pass its bulk, as a real host's qdisc does.

Each node has a sparse file attached as a loop device for its disk, is registered in the
inventory (group ``testbed``, install method image, no profile), and is "powered on" by
running :mod:`corral.testbed.firmware` in its namespace, which follows the boot scripts of
the ``corral serve`` that ``up`` starts in ``ctb-srv``, as iPXE would, and execs the real
agent with the command line and token they give.

Here is :class:`Testbed`, which makes, powers and takes down all that. What a testbed is,
and the checks of the options that ask for one, are in :mod:`corral.testbed.plan`; its
links as ``ip`` and ``tc`` lines in :mod:`corral.testbed.links`; its nodes' entries in
the inventory in :mod:`corral.testbed.inventory`.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from corral.config import Settings
from corral.errors import CommandFailed, CorralError, InvalidValue, UsageError
from corral.run import pid_alive, run, spawn, stop_pids
from corral.serve.assets import api_token
from corral.testbed.inventory import GROUP, register_nodes, release_nodes
from corral.testbed.links import (
    endpoint_commands,
    host_shaping,
    hub_commands,
    loss_filter,
    neighbour_commands,
    tbf,
)
from corral.testbed.netns import (
    list_namespaces,
    namespace_pid_map,
)
from corral.testbed.plan import (
    HUB,
    PREFIX,
    SERVER_NS,
    NodeInfo,
    TestbedState,
    format_rate,
    loss_text,
    node_name,
    parse_rate,
    plan,
    summarize_racks,
    summarize_rates,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

#: The testbed's names that its users (the CLI, benchmarks, tests) take from here, besides
#: :class:`Testbed`: where the namespaces are, how links are shaped, how rates are spelt.
__all__ = [
    "GROUP",
    "HUB",
    "POWER_ACTIONS",
    "PREFIX",
    "SERVER_NS",
    "DownReport",
    "Testbed",
    "TestbedError",
    "TestbedExists",
    "TestbedState",
    "format_rate",
    "host_shaping",
    "loss_filter",
    "loss_text",
    "node_name",
    "parse_rate",
    "summarize_racks",
    "summarize_rates",
    "tbf",
    "tcp_segments",
]

log = logging.getLogger("corral.testbed")

POWER_ACTIONS = ("on", "off", "cycle")
#: The nodes' processes yield the host's CPUs to the server's, as a real server has its
#: own. Each node is a session of its own (setsid), and Linux's autogroup scheduling gives
#: every session an equal share whatever its processes' nice: a hundred busy nodes left
#: corral serve a hundredth of the host, and its reports and tracker timed out for
#: minutes. The niceness is therefore their session's (``/proc/PID/autogroup``) too.
NODE_NICE = 19
_DISK_FILE = re.compile(r"/testbed/disks/tb\d{3}\.img$")
#: Seconds ``down`` waits for the disks' loop devices to go. ``losetup --detach`` of a
#: device something still holds open only marks it to go when that is closed (a fresh-clone
#: CI run saw one left right after the nodes' processes were stopped, while other tests
#: ran beside them), so down asks again until they are gone or this is over.
LOOP_DETACH_WAIT = 10.0
_PROBE = "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2).read()"
_GET = (
    "import os, sys, urllib.request as u; "
    "bearer = 'Bearer ' + os.environ['CORRAL_TOKEN']; "
    "q = u.Request(sys.argv[1], headers={'authorization': bearer}); "
    "sys.stdout.write(u.urlopen(q, timeout=30).read().decode())"
)


class TestbedError(CorralError):
    """The testbed could not be built, changed or taken down."""


#: Where the host's kernel lists the TCP congestion controls it has, and those that a
#: network namespace other than the host's may choose.
_TCP_CONGESTION = Path("/proc/sys/net/ipv4")
#: ... and the one its network namespace runs (each namespace reads its own there).
_CONGESTION_CONTROL = _TCP_CONGESTION / "tcp_congestion_control"


def _load_module(name: str) -> None:
    if shutil.which("modprobe"):
        run(["modprobe", name], check=False)


def allow_congestion_control(
    name: str, sysctl: Path = _TCP_CONGESTION, load: Callable[[str], None] = _load_module
) -> bool:
    """Let the nodes' namespaces run TCP congestion control ``name``; False if the host's
    kernel has none of that name (its module ``tcp_NAME`` is loaded first if it can be).

    A namespace starts with the host's congestion control, which is the host's choice
    (BBR on the machine the benchmarks ran on), not that of the kernel a node boots. A
    namespace may set only one the host allows (``tcp_allowed_congestion_control``), so
    ``name`` is added to that list if it is missing; that lets the host's unprivileged
    processes choose it for their sockets too, and nothing else changes on the host."""
    available = (sysctl / "tcp_available_congestion_control").read_text().split()
    if name not in available:
        load(f"tcp_{name}")
        available = (sysctl / "tcp_available_congestion_control").read_text().split()
        if name not in available:
            return False
    allowed_file = sysctl / "tcp_allowed_congestion_control"
    allowed = allowed_file.read_text().split()
    if name not in allowed:
        allowed_file.write_text(" ".join([*allowed, name]) + "\n")
        log.info("allowed TCP congestion control %s in the host's network namespaces", name)
    return True


def yield_cpu(pid: int, nice: int) -> None:
    """Give the session of ``pid`` (its autogroup: every process it has and will have)
    the scheduling weight of ``nice``. Without autogroup scheduling (a kernel built
    without it, or ``kernel.sched_autogroup_enabled=0``), the processes' own nice rules
    and there is nothing to do."""
    autogroup = Path(f"/proc/{pid}/autogroup")
    try:
        autogroup.write_text(f"{nice}\n")
    except FileNotFoundError:
        return  # no autogroup in this kernel, or the process is gone
    except OSError as exc:
        log.warning("cannot lower the CPU weight of process %d: %s", pid, exc)


class TestbedExists(UsageError):
    """``up`` while (parts of) a testbed exist."""


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

    def _detached(self, seconds: float) -> list[str]:
        """The testbed's loop devices still there after asking them to detach, once more
        every half second, for up to ``seconds`` (see :data:`LOOP_DETACH_WAIT`)."""
        deadline = time.monotonic() + seconds
        left = self.loop_devices()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            run(["losetup", "--detach", *left], check=False)
            left = self.loop_devices()
        return left

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

    def server_get(self, path: str) -> str:
        """The body of an admin GET to corral serve (``/metrics``, ``/api/v1/...``), asked
        from the server's namespace with the home's API token (in the environment, not on
        a command line that ``ps`` shows)."""
        state = self.require_state()
        token = api_token(self.settings.home)
        url = state.server_url + path
        argv = ["ip", "netns", "exec", SERVER_NS, sys.executable, "-c", _GET, url]
        return run(argv, env=os.environ | {"CORRAL_TOKEN": token}).stdout

    def server_tcp_segments(self) -> tuple[int, int]:
        """(segments sent, segments sent again) by the server's TCP since ``up``: its
        namespace's ``/proc/net/snmp``. The second share of the first is what the
        server's egress spent on retransmissions, which no byte count of the transports'
        own shows."""
        out = run(["ip", "netns", "exec", SERVER_NS, "cat", "/proc/net/snmp"]).stdout
        return tcp_segments(out)

    def tcp_congestion(self) -> dict[str, str]:
        """The TCP congestion control of the server's namespace and of the first node's
        (``{"server": "bbr", "nodes": "cubic"}``): the nodes run their kernel's, the server
        the host's (see :func:`allow_congestion_control`)."""
        state = self.require_state()
        read = ["cat", str(_CONGESTION_CONTROL)]
        found = {}
        for role, namespace in (("server", SERVER_NS), ("nodes", state.nodes[0].namespace)):
            found[role] = run(["ip", "netns", "exec", namespace, *read]).stdout.strip()
        return found

    def uplink_bytes(self) -> dict[str, tuple[int, int]]:
        """Rack name -> (bytes into the rack, bytes out of it) through its uplink since
        ``up``; empty for a testbed without racks.

        Read from the uplink's end on the core bridge, whose tx is what went into the rack
        and rx what came out (Ethernet frames, headers included), in one ``ip`` call.
        """
        state = self.require_state()
        if not state.racks:
            return {}
        out = run(["ip", "-n", HUB, "-j", "-s", "link", "show"], check=False)
        if out.returncode != 0:
            raise TestbedError(
                f"cannot read the uplinks' counters in {HUB}: {out.stderr.strip()}",
                "the testbed is half down: run 'corral testbed down' and up again",
            )
        stats = {link["ifname"]: link.get("stats64", {}) for link in json.loads(out.stdout)}
        found: dict[str, tuple[int, int]] = {}
        for rack in state.racks:
            counters = stats.get(rack.core_port)
            if not counters:
                raise TestbedError(
                    f"uplink {rack.core_port} of rack {rack.name} is missing in {HUB}",
                    "run 'corral testbed down' and up again",
                )
            found[rack.name] = (int(counters["tx"]["bytes"]), int(counters["rx"]["bytes"]))
        return found

    def queue_drops(self) -> dict[str, int]:
        """Packets the links' queues have dropped since ``up``: ``to_nodes``, at the hub's
        ports toward the nodes (what the server and the other nodes sent them: a full
        switch port), and ``server``, at the server's own ``eth0`` (its queue before its
        link). Two ``tc`` calls; what a transport's TCP sent again was lost there, or to
        ``--loss``."""
        state = self.require_state()
        hub = run(["tc", "-n", HUB, "-j", "-s", "qdisc", "show"], check=False)
        server = run(["tc", "-n", SERVER_NS, "-j", "-s", "qdisc", "show"], check=False)
        if hub.returncode or server.returncode:
            raise TestbedError(
                f"cannot read the queues' counters: {(hub.stderr or server.stderr).strip()}",
                "the testbed is half down: run 'corral testbed down' and up again",
            )
        return {
            "to_nodes": qdisc_drops(hub.stdout, {n.port for n in state.nodes}),
            "server": qdisc_drops(server.stdout, {"eth0"}),
        }

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
        racks: int | None = None,
        rack_uplink: str | int | None = None,
        serve: bool = True,
    ) -> TestbedState:
        """Build the testbed; on any failure, take down what was made and re-raise.

        ``racks`` puts the nodes into that many racks behind uplinks of ``rack_uplink``
        (see :func:`corral.testbed.plan.plan`); :meth:`uplink_bytes` then counts each
        uplink's traffic.
        """
        state = plan(
            nodes,
            link,
            server_link=server_link,
            loss=loss,
            slow=slow,
            disk_size=disk_size,
            http_port=http_port,
            racks=racks,
            rack_uplink=rack_uplink,
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
        bridges = f"{len(state.racks) + 1} bridges" if state.racks else "the bridge"
        self.progress(f"linking {len(state.nodes) + len(state.racks) + 1} veth pairs to {bridges}")
        run(["ip", "-n", HUB, "-batch", "-"], input="\n".join(ip) + "\n")
        run(["tc", "-n", HUB, "-batch", "-"], input="\n".join(tc) + "\n")
        self.progress(f"configuring {len(state.nodes)} nodes")
        prefix = ipaddress.IPv4Network(state.network).prefixlen
        jobs: list[tuple[str, str, int | None]] = [(SERVER_NS, state.server_ip, state.server_link)]
        jobs += [(n.namespace, n.ip, n.rate) for n in state.nodes]

        neighbours = neighbour_commands(state)
        # a node's TCP is its kernel's, not this host's (the server's stays the host's);
        # imported here, as the ramdisk's package takes 0.2 s to import
        from corral.images.ramdisk.contents import KERNEL_TCP_CONGESTION

        tcp: str | None = KERNEL_TCP_CONGESTION
        if not allow_congestion_control(KERNEL_TCP_CONGESTION):
            tcp = None
            host = _CONGESTION_CONTROL.read_text().strip()
            self.progress(
                f"warning: this kernel has no TCP {KERNEL_TCP_CONGESTION}: the nodes run {host}"
            )

        def configure(job: tuple[str, str, int | None]) -> None:
            namespace, address, rate = job
            ip = endpoint_commands(address, prefix) + neighbours
            run(["ip", "-n", namespace, "-batch", "-"], input=ip)
            if rate is not None:
                tc = "\n".join(host_shaping("eth0", rate)) + "\n"
                run(["tc", "-n", namespace, "-batch", "-"], input=tc)
            if tcp is not None and namespace != SERVER_NS:
                tee = ["tee", str(_CONGESTION_CONTROL)]
                run(["ip", "netns", "exec", namespace, *tee], input=tcp + "\n")

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
        """Add or update the nodes in the inventory (see :func:`register_nodes`); returns
        counts by outcome."""
        counts = register_nodes(self.engine, state)
        self.progress(
            f"inventory: {counts['created']} nodes created, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged"
        )
        return counts

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
        stop_pids(self.node_power(info.name)[1], grace=3.0)
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
        yield_cpu(pid, NODE_NICE)
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
        survivors = stop_pids(pids)
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
        left_loops = self._detached(LOOP_DETACH_WAIT)
        if survivors or left_ns or left_loops:
            raise TestbedError(
                f"testbed only partly down: {len(survivors)} processes, {len(left_ns)} "
                f"namespaces, {len(left_loops)} loop devices remain",
                "see what holds them ('losetup -l', 'ip netns pids NS') and run down again",
            )
        return report

    def _inventory_nodes(self, forget: bool) -> tuple[list[str], list[str]]:
        """(nodes removed, nodes kept) of the testbed's group in the inventory; an
        inventory that cannot be read only matters to ``forget``."""
        try:
            return release_nodes(self.engine, forget=forget)
        except CorralError as exc:
            if forget:
                raise
            log.warning("cannot read the inventory: %s", exc)
            return [], []


def qdisc_drops(tc_json: str, devices: Iterable[str]) -> int:
    """The packets dropped by the root qdiscs of ``devices`` in the output of
    ``tc -j -s qdisc show`` with no ``dev`` (with one, tc leaves the device's name out). A
    root's count includes its children's: tbf counts what the queue under it refused."""
    wanted = set(devices)
    return sum(
        int(q.get("drops", 0))
        for q in json.loads(tc_json or "[]")
        if q.get("root") and q.get("dev") in wanted
    )


def tcp_segments(snmp: str) -> tuple[int, int]:
    """(OutSegs, RetransSegs) of ``/proc/net/snmp``'s text: its ``Tcp:`` header line, then
    the line of values."""
    rows = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Tcp:")]
    if len(rows) != 2:
        raise CorralError("no Tcp lines in /proc/net/snmp")
    values = dict(zip(rows[0], rows[1], strict=True))
    return int(values["OutSegs"]), int(values["RetransSegs"])
