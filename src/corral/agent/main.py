"""The agent's life: network up, report to corral, then install (``corral.mode=deploy``)
or wait for work, and finally what ``corral.agent_exit=`` says (power off, reboot...).

In deploy mode the agent asks corral for its install plan (asking again while the answer is
204, "nothing yet") and hands it to :class:`corral.agent.deploy.Installer`.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.agent import facts as hw
from corral.agent.cmdline import EXIT_ACTIONS, BootOrders
from corral.agent.deploy import Installer, InstallSettings
from corral.agent.diskless import NEWROOT, DisklessBoot
from corral.agent.network import (
    NetworkError,
    interface_ipv4,
    read_lease,
    source_address,
    write_udhcpc_script,
)
from corral.agent.phases import NODE_REPORTS
from corral.agent.plan import Plan
from corral.agent.report import Client, Rejected, ReportError
from corral.agent.run import Runner, SubprocessRunner

log = logging.getLogger("corral.agent")

#: The server keeps at most this many characters of an event message.
MAX_MESSAGE = 4000
#: The longest the agent waits for a relay still serving another node before a reboot.
LINGER_LIMIT = 60.0

#: ioctl that reads an interface's hardware address (linux/sockios.h).
_SIOCGIFHWADDR = 0x8927


@dataclass(frozen=True)
class Paths:
    """Where the agent reads and writes; tests point these at temporary directories."""

    proc: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    token: Path = Path("/etc/corral/node-token")
    log: Path = Path("/var/log/corral-agent.log")
    run: Path = Path("/run/corral")
    resolv: Path = Path("/etc/resolv.conf")
    #: where the node's filesystems are mounted while it is installed
    target: Path = Path("/run/corral/target")
    #: where a diskless boot leaves the root /init switches to
    newroot: Path = NEWROOT


@dataclass(frozen=True)
class Link:
    """The NIC the agent talks through."""

    interface: str
    mac: str
    ip: str | None


@dataclass
class Settings:
    """Knobs of the agent's patience."""

    tries: int = 5
    #: seconds a request keeps being retried when the server cannot be reached (a server
    #: restarting mid-install); corral fails a node silent for 30 s, not one waiting on it
    patience: float = 0.0
    backoff: float = 1.0
    http_timeout: float = 15.0
    nic_timeout: float = 20.0
    dhcp_tries: int = 10
    poll: float = 0.2
    wait_interval: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)
    #: how long to keep asking for an install plan while corral has none (204)
    plan_timeout: float = 600.0
    #: seconds corral may hold a plan request, answering as soon as the node has a plan
    #: (a chain forms the moment its last node asks); under ``http_timeout``
    plan_wait: float = 10.0
    #: seconds between plan requests that a server answered at once (one without
    #: ``?wait=``)
    plan_poll: float = 5.0
    post_timeout: float = 3600.0


class Agent:
    def __init__(
        self,
        orders: BootOrders,
        paths: Paths | None = None,
        settings: Settings | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        runner: Runner | None = None,
    ) -> None:
        self.orders = orders
        self.paths = paths or Paths()
        self.settings = settings or Settings()
        self.sleep = sleep
        self.clock = clock
        self.runner: Runner = runner or SubprocessRunner(self.settings.extra_env)
        self.link: Link | None = None
        self._client: Client | None = None
        self.installer: Installer | None = None

    # --- reading the machine -------------------------------------------------------

    @property
    def token(self) -> str | None:
        text = hw.read_text(self.paths.token)
        return "".join(text.split()) if text else None

    def interface_ipv4(self, name: str) -> str | None:
        return interface_ipv4(name)

    def interface_mac(self, name: str) -> str:
        """From sysfs, else from the kernel (a network namespace may see the host's sysfs)."""
        mac = hw.nic_mac(self.paths.sysfs, name)
        if mac:
            return mac
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                packed = struct.pack("256s", name.encode()[:15])
                data = fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, packed)
        except OSError:
            return ""
        return ":".join(f"{b:02x}" for b in data[18:24])

    def install_disk(self) -> str | None:
        """The disk named on the command line, else the first fixed disk the kernel shows."""
        if self.orders.disk:
            return self.orders.disk
        disks = hw.disks(self.paths.sysfs)
        fixed = [d for d in disks if not d.removable] or disks
        return f"/dev/{fixed[0].name}" if fixed else None

    @property
    def efi(self) -> bool:
        return (self.paths.sysfs / "firmware" / "efi").is_dir()

    def facts(self) -> hw.Facts:
        sysfs = self.paths.sysfs
        nics = [
            hw.Nic(
                name=name,
                mac=hw.nic_mac(sysfs, name),
                carrier=hw.nic_carrier(sysfs, name),
                driver=hw.nic_driver(sysfs, name),
                ipv4=self.interface_ipv4(name),
            )
            for name in hw.physical_nics(sysfs)
        ]
        return hw.Facts(
            kernel=hw.kernel_release(self.paths.proc),
            cpus=hw.cpu_count(self.paths.proc),
            memory_mb=hw.memory_mb(self.paths.proc),
            disks=hw.disks(sysfs),
            nics=nics,
            vendor=hw.dmi(sysfs, "sys_vendor"),
            product=hw.dmi(sysfs, "product_name"),
        )

    # --- commands ------------------------------------------------------------------

    def command(self, argv: Sequence[str], timeout: float = 60) -> int:
        """Run ``argv``, log its output, return its exit code (127 if missing, 124 after
        ``timeout``)."""
        return self.runner(argv, timeout=timeout).returncode

    # --- the network ---------------------------------------------------------------

    def _candidates(self) -> list[str]:
        if self.orders.interface:
            # named on the command line: whatever it is (a veth in a network namespace has
            # no device behind it), as long as this network namespace has it
            try:
                socket.if_nametoindex(self.orders.interface)
            except OSError:
                return []
            return [self.orders.interface]
        names = hw.physical_nics(self.paths.sysfs)
        boot_mac = self.orders.boot_mac
        if boot_mac:
            names.sort(key=lambda n: hw.nic_mac(self.paths.sysfs, n) != boot_mac)
        return names

    def _wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() >= deadline:
                return False
            self.sleep(self.settings.poll)
        return True

    def network_up(self) -> Link:
        """The first NIC with a carrier, configured by DHCP unless it already has an address.

        NICs named by ``BOOTIF=`` come first. Raises :class:`NetworkError` if none gets a lease.
        """
        sysfs = self.paths.sysfs
        if not self._wait(lambda: bool(self._candidates()), self.settings.nic_timeout):
            raise NetworkError("no network interface appeared (is its driver loaded?)")
        names = self._candidates()
        for name in names:
            ip = self.interface_ipv4(name)
            if ip:
                log.info("%s is already configured: %s", name, ip)
                self.link = Link(name, self.interface_mac(name), ip)
                return self.link
        self.command(["ip", "link", "set", "dev", "lo", "up"])
        for name in names:
            self.command(["ip", "link", "set", "dev", name, "up"])
        self._wait(lambda: any(hw.nic_carrier(sysfs, n) for n in names), self.settings.nic_timeout)
        with_carrier = [n for n in names if hw.nic_carrier(sysfs, n)]
        if not with_carrier:
            log.warning("no carrier on %s: trying DHCP anyway", ", ".join(names))
        script = write_udhcpc_script(self.paths.run, self.paths.resolv)
        for name in with_carrier or names:
            argv = ["udhcpc", "-i", name, "-q", "-n", "-t", str(self.settings.dhcp_tries)]
            argv += ["-s", str(script)]
            if self.orders.node:
                argv += ["-x", f"hostname:{self.orders.node}"]
            log.info("%s: asking for an address (DHCP)", name)
            rc = self.command(argv, timeout=self.settings.dhcp_tries * 4 + 15)
            lease = read_lease(self.paths.run, name)
            if rc == 0 and lease:
                log.info(
                    "%s: %s/%s via %s", name, lease["ip"], lease.get("mask"), lease.get("router")
                )
                self.link = Link(name, self.interface_mac(name), lease["ip"])
                return self.link
            log.warning("%s: no DHCP lease", name)
        raise NetworkError(f"no DHCP lease on {', '.join(with_carrier or names)}")

    # --- talking to corral ---------------------------------------------------------

    @property
    def client(self) -> Client | None:
        if self._client is None and self.orders.server:
            self._client = Client(
                self.orders.server,
                self.token,
                tries=self.settings.tries,
                backoff=self.settings.backoff,
                timeout=self.settings.http_timeout,
                sleep=self.sleep,
                patience=self.settings.patience,
            )
        return self._client

    def report(self, phase: str, message: str = "") -> bool:
        """Post an event for this node; False (logged) if it could not be delivered."""
        if phase not in NODE_REPORTS:
            raise ValueError(f"unknown phase {phase!r}: one of {', '.join(NODE_REPORTS)}")
        client, node = self.client, self.orders.node
        if client is None or not node:
            log.warning("no corral.server= or corral.node= on the command line: %s not sent", phase)
            return False
        path = f"/api/v1/nodes/{urllib.parse.quote(node, safe='')}/events"
        try:
            client.post(path, {"phase": phase, "message": message[:MAX_MESSAGE]})
        except Rejected as exc:
            log.error("corral refused the %s event: %s", phase, exc)
            return False
        except ReportError as exc:
            log.error("%s", exc)
            return False
        log.info("reported %s to %s: %s", phase, client.server, message)
        return True

    def discover(self, facts: hw.Facts, link: Link) -> str | None:
        """Register this unknown machine; returns the node name corral gave it."""
        client = self.client
        if client is None:
            log.warning("no corral.server= on the command line: discovery not sent")
            return None
        try:
            answer = client.post("/api/v1/discover", facts.discovery(link.mac), auth=False)
        except ReportError as exc:
            log.error("discovery failed: %s", exc)
            return None
        node = answer.get("node") if isinstance(answer, dict) else None
        log.info("discovered as node %s", node)
        return str(node) if node else None

    def fetch_plan(self) -> Plan | None:
        """This node's install plan, asked for until corral has one or
        ``settings.plan_timeout`` has passed; None (reported as ``failed``) without one."""
        client, node = self.client, self.orders.node
        if client is None or not node:
            log.error("deploy mode needs corral.server= and corral.node= on the command line")
            return None
        path = f"/api/v1/nodes/{urllib.parse.quote(node, safe='')}/plan"
        # held by corral until there is a plan: within the HTTP timeout, with room to spare
        hold = min(self.settings.plan_wait, self.settings.http_timeout - 5.0)
        if hold >= 1.0:
            path += f"?wait={hold:g}"
        waited = 0.0
        said = False
        while True:
            asked = self.clock()
            try:
                status, body = client.get(path)
            except Rejected as exc:
                log.error("corral refused to give the install plan: %s", exc)
                self.report("failed", f"no install plan: {exc}")
                return None
            except ReportError as exc:
                log.warning("%s", exc)
                status, body = 0, None
            if status == 200 and isinstance(body, dict):
                try:
                    plan = Plan.from_dict(body)
                except ValueError as exc:
                    log.error("%s", exc)
                    self.report("failed", str(exc))
                    return None
                log.info(
                    "install plan: deployment %d, image %s by %s onto %s",
                    plan.deployment,
                    plan.image.ref,
                    plan.transport.name,
                    plan.disk.device or "the first disk",
                )
                return plan
            if status == 200:
                log.warning("the plan is not a JSON object: asking again")
            held = self.clock() - asked
            waited += held
            if waited >= self.settings.plan_timeout:
                message = f"no install plan after {waited:.0f} s"
                log.error("%s", message)
                self.report("failed", message)
                return None
            if not said:
                log.info("no install plan yet: waiting for one")
                said = True
            if hold >= 1.0 and held >= hold / 2:
                continue  # corral held the request until now: ask again at once
            self.sleep(self.settings.plan_poll)
            waited += self.settings.plan_poll

    def boot_diskless(self) -> int:
        """Fetch the plan and put the image in RAM at :data:`NEWROOT`; 0 once it is ready
        for ``/init`` to switch to."""
        # a boot waits for its session: ask often (the answer is cheap)
        self.settings.plan_poll = min(self.settings.plan_poll, 1.0)
        plan = self.fetch_plan()
        if plan is None:
            return 1
        if plan.mode != "diskless":
            log.error("booted diskless, but corral's plan installs %s on a disk", plan.image.ref)
            self.report("failed", "booted diskless, but corral's plan is an install")
            return 1
        settings = InstallSettings(
            work_dir=self.paths.newroot,
            disk=self.orders.disk
            or (plan.diskless and plan.diskless.device)
            or self.install_disk(),
            tries=self.settings.tries,
            post_timeout=self.settings.post_timeout,
        )
        return self.carry_out(
            DisklessBoot(
                plan, self.client, self.runner, settings, sleep=self.sleep, run_dir=self.paths.run
            ),
            "booted",
        )

    def deploy(self) -> int:
        """Fetch the plan and install it; 0 once the node is installed."""
        plan = self.fetch_plan()
        if plan is None:
            return 1
        settings = InstallSettings(
            work_dir=self.paths.target,
            disk=self.orders.disk or (None if plan.disk.device else self.install_disk()),
            efi=self.efi,
            tries=self.settings.tries,
            post_timeout=self.settings.post_timeout,
            reboot=self.orders.agent_exit == "reboot",
        )
        return self.carry_out(
            Installer(plan, self.client, self.runner, settings, sleep=self.sleep), "installed"
        )

    def carry_out(self, installer: Installer, what: str) -> int:
        """Run the plan; 0 once it is done, the log saying ``what`` or why not."""
        self.installer = installer
        final = installer.run()
        if final.phase == "done":
            log.info("%s: %s", what, final.message)
            return 0
        log.error("not %s: %s", what, final.message)
        return 1

    # --- the life cycle ------------------------------------------------------------

    def wait_for_instructions(self) -> None:
        """Stay up for the operator or for work to come (a plan to fetch, later)."""
        log.info("waiting for instructions")
        while True:
            self.sleep(self.settings.wait_interval)

    def finish(self, failed: bool = False) -> int:
        action = self.orders.agent_exit
        if failed and action == "reboot":
            # Rebooting would boot a disk the install left half-written: the ramdisk stays
            # up, its console and log (and corral's status) say why
            log.error("not rebooting: the install failed (re-arm with 'corral node reinstall')")
            action = "wait"
        if action in ("poweroff", "reboot"):
            serving_others(LINGER_LIMIT)
            log.info("%s", "powering off" if action == "poweroff" else "rebooting")
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.sync()
            rc = self.command([action, "-f"])
            return 0 if rc == 0 else 1
        if action == "wait":
            self.wait_for_instructions()
        return 0

    def run(self) -> int:
        orders = self.orders
        log.info(
            "corral agent: server=%s node=%s mode=%s",
            orders.server or "-",
            orders.node or "-",
            "discover" if orders.discover else orders.mode or "-",
        )
        try:
            link = self.network_up()
        except NetworkError as exc:
            log.error("network: %s", exc)
            self.finish(failed=True)
            return 1
        facts = self.facts()
        ip = link.ip
        if self.client is not None:
            ip = source_address(self.client.host, self.client.port) or ip
        rc = 0
        if orders.discover:
            self.discover(facts, link)
        else:
            self.report("booted", facts.summary(ip, link.mac))
            if orders.mode == "deploy":
                rc = self.deploy()
            elif orders.mode == "diskless":
                rc = self.boot_diskless()
                if rc == 0:
                    serving_others(LINGER_LIMIT)  # a chain successor still pulling from us
                    return 0  # /init switches to the new root
        return self.finish(failed=rc != 0) or rc


def serving_others(limit: float) -> None:
    """Wait, at most ``limit`` seconds, for the agent's threads that still serve other
    nodes (a chain relay whose successor is still pulling: they are the non-daemon ones)
    before the machine goes down under them."""
    deadline = time.monotonic() + limit
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        log.info("waiting for %s before going down", thread.name)
        thread.join(max(0.0, deadline - time.monotonic()))


def setup_logging(log_file: Path, verbose: bool = False) -> list[logging.Handler]:
    """Log to the console (stderr) and to ``log_file``; returns the handlers added."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter("%(asctime)s corral-agent: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(fmt)
    root.addHandler(console)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file)
    except OSError as exc:
        log.warning("cannot write %s: %s", log_file, exc)
        return [console]
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(file)
    return [console, file]


def main(argv: Sequence[str] | None = None) -> int:
    default = Paths()
    parser = argparse.ArgumentParser(prog="corral-agent", description=__doc__)
    parser.add_argument("--cmdline", type=Path, help="kernel command line file [PROC/cmdline]")
    parser.add_argument("--proc", type=Path, default=default.proc)
    parser.add_argument("--sys", dest="sysfs", type=Path, default=default.sysfs)
    parser.add_argument("--token-file", type=Path, default=default.token)
    parser.add_argument("--log-file", type=Path, default=default.log)
    parser.add_argument("--run-dir", type=Path, default=default.run)
    parser.add_argument("--resolv", type=Path, default=default.resolv)
    parser.add_argument("--exit", choices=EXIT_ACTIONS, help="overrides corral.agent_exit=")
    parser.add_argument("--tries", type=int, default=5, help="tries of each report")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay (s)")
    parser.add_argument(
        "--patience",
        type=float,
        default=120.0,
        help="keep retrying an unreachable server this long (s)",
    )
    parser.add_argument(
        "--interface",
        metavar="NAME",
        help="talk through this NIC as it is configured (overrides corral.interface=)",
    )
    parser.add_argument(
        "--disk", metavar="DEVICE", help="install on this disk (overrides the plan, corral.disk=)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="where the node's filesystems are mounted while installing [RUN_DIR/target]",
    )
    parser.add_argument(
        "--newroot",
        type=Path,
        default=default.newroot,
        metavar="DIR",
        help="diskless mode: where the image's root is left mounted for /init [%(default)s]",
    )
    parser.add_argument(
        "--plan-timeout",
        type=float,
        default=Settings.plan_timeout,
        metavar="SECONDS",
        help="how long to wait for an install plan in deploy mode",
    )
    parser.add_argument(
        "--plan-wait",
        type=float,
        default=Settings.plan_wait,
        metavar="SECONDS",
        help="how long corral may hold each request for it, answering once there is one "
        "(0: not at all) [%(default)g]",
    )
    parser.add_argument(
        "--plan-poll",
        type=float,
        default=Settings.plan_poll,
        metavar="SECONDS",
        help="seconds between requests for it that corral answers at once [%(default)g]",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    paths = Paths(
        args.proc,
        args.sysfs,
        args.token_file,
        args.log_file,
        args.run_dir,
        args.resolv,
        args.work_dir or args.run_dir / "target",
        args.newroot,
    )
    handlers = setup_logging(paths.log, args.verbose)
    cmdline = hw.read_text(args.cmdline or paths.proc / "cmdline", "") or ""
    orders = BootOrders.from_cmdline(cmdline)
    if args.exit:
        orders = replace(orders, agent_exit=args.exit)
    if args.interface:
        orders = replace(orders, interface=args.interface)
    if args.disk:
        orders = replace(orders, disk=args.disk)
    settings = Settings(
        tries=args.tries,
        backoff=args.backoff,
        patience=args.patience,
        plan_timeout=args.plan_timeout,
        plan_wait=args.plan_wait,
        plan_poll=args.plan_poll,
    )
    try:
        return Agent(orders, paths, settings).run()
    except KeyboardInterrupt:
        return 130
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
