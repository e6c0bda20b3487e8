"""An isolated layer-2 network in a network namespace, for PXE-boot tests.

Every namespace a test makes is named with a per-run prefix (:func:`run_prefix`), so that
:func:`cleanup_stale` can remove what a crashed run left behind without touching the
namespaces of runs still alive.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from types import TracebackType

from corral.errors import CorralError
from corral.run import pid_alive, run, stop_pids

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "cvt"

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def run_prefix(base: str = DEFAULT_PREFIX) -> str:
    """A namespace name prefix unique to this process: ``<base><pid>-``."""
    return f"{base}{os.getpid()}-"


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def kill_namespace_processes(name: str, grace: float = 5.0) -> None:
    """Stop every process still inside namespace ``name``: SIGTERM, then SIGKILL."""
    stop_pids(namespace_pids(name), grace)


def delete_namespace(name: str) -> None:
    """Remove namespace ``name`` and everything in it (links, bridge, taps); no error if gone."""
    if name not in list_namespaces():
        return
    kill_namespace_processes(name)
    out = run(["ip", "netns", "del", name], check=False)
    if out.returncode != 0 and name in list_namespaces():
        raise CorralError(f"cannot delete network namespace {name}: {out.stderr.strip()}")


def cleanup_stale(base: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces named ``<base><pid>-...`` whose creating process is gone.

    Returns the names removed. Namespaces of live runs (including this one) are kept.
    """
    removed = []
    pattern = re.compile(re.escape(base) + r"(\d+)-")
    for name in list_namespaces():
        m = pattern.match(name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        log.info("removing stale network namespace %s", name)
        delete_namespace(name)
        removed.append(name)
    return removed


class PxeNetwork:
    """A namespace holding a bridge with an address: the boot network of a test.

    >>> with PxeNetwork(run_prefix() + "bios") as net:      # doctest: +SKIP
    ...     tap = net.add_tap("tap0")
    ...     net.run(["ip", "addr"])

    Leaving the block kills whatever still runs inside and deletes the namespace, which
    removes the bridge and the taps with it. That also happens when entering fails halfway.

    ``address6`` (e.g. ``fd00:88::1/64``) also gives the bridge an IPv6 address, so that a
    DHCP server can send router advertisements (:meth:`dnsmasq_ra_args`). Worth it for
    iPXE clients: qemu's iPXE configures IPv6 as well as DHCPv4 before it runs the boot
    file, and without any router advertisement it waits about 13 s for one.
    """

    def __init__(
        self,
        name: str,
        *,
        address: str = "10.88.0.1/24",
        address6: str | None = None,
        bridge: str = "br0",
    ) -> None:
        if not _IFNAME.match(bridge):
            raise CorralError(f"bad bridge name {bridge!r}")
        if "/" in name or not name or len(name) > 200:
            raise CorralError(f"bad namespace name {name!r}")
        self.name = name
        self.bridge = bridge
        self.interface = ipaddress.IPv4Interface(address)
        self.interface6 = ipaddress.IPv6Interface(address6) if address6 else None
        self._created = False

    # --- addresses ---------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        """The bridge's address: where the test's servers listen."""
        return str(self.interface.ip)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.interface.network

    def host(self, n: int) -> str:
        """The ``n``-th address of the network (``host(50)`` -> ``10.88.0.50``)."""
        addr = self.network.network_address + n
        if n <= 0 or addr not in self.network or addr == self.network.broadcast_address:
            raise CorralError(f"{addr} is not a host address of {self.network}")
        return str(addr)

    def dnsmasq_ra_args(self) -> list[str]:
        """dnsmasq options that advertise ``address6``'s prefix (router advertisements only,
        no DHCPv6), so that iPXE finishes its IPv6 configuration at once."""
        if self.interface6 is None:
            return []
        return ["--enable-ra", f"--dhcp-range={self.interface6.network.network_address},ra-only"]

    # --- life cycle --------------------------------------------------------------------

    def __enter__(self) -> PxeNetwork:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create(self) -> None:
        run(["ip", "netns", "add", self.name])
        self._created = True
        try:
            self.ip("link", "set", "lo", "up")
            self.ip(
                "link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"
            )
            self.ip("addr", "add", str(self.interface), "dev", self.bridge)
            if self.interface6 is not None:
                self.ip("addr", "add", str(self.interface6), "dev", self.bridge, "nodad")
            self.ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill what runs inside, delete the namespace; safe to call twice."""
        if self._created:
            delete_namespace(self.name)
            self._created = False

    # --- using it ----------------------------------------------------------------------

    def ip(self, *args: str) -> str:
        """Run ``ip -n NAME ARGS...`` and return its output."""
        return run(["ip", "-n", self.name, *args]).stdout

    def exec(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, timeout: float | None = 60) -> str:
        """Run ``argv`` inside the namespace to completion and return its output."""
        return run(self.exec(argv), timeout=timeout).stdout

    def add_tap(self, name: str) -> str:
        """Create tap ``name`` on the bridge (for qemu's ``-netdev tap,ifname=``)."""
        if not _IFNAME.match(name):
            raise CorralError(f"bad interface name {name!r}")
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        try:
            self.ip("link", "set", name, "master", self.bridge)
            self.ip("link", "set", name, "up")
        except BaseException:
            self.remove_link(name)
            raise
        return name

    def remove_link(self, name: str) -> None:
        run(["ip", "-n", self.name, "link", "del", name], check=False)


# --- many namespaces at once (the testbed's hundreds) ----------------------------------

NETNS_DIR = "/run/netns"


def namespace_pid_map(prefix: str) -> dict[str, list[int]]:
    """Processes of every namespace named ``<prefix>...``, by namespace, in one /proc scan.

    What ``ip netns pids`` does for one namespace (compare each process's ``ns/net`` with
    the namespace's bind mount), without a subprocess per namespace.
    """
    wanted: dict[tuple[int, int], str] = {}
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return {}
    for name in entries:
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(NETNS_DIR, name))
                wanted[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in wanted.values()}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, or a kernel thread
        owner = wanted.get((st.st_dev, st.st_ino))
        if owner is not None and int(entry) != os.getpid():
            found[owner].append(int(entry))
    return found
