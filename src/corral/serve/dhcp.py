"""DHCP for network boot, served by dnsmasq (DHCP only: no DNS, no TFTP).

Two modes:

``full``
    corral is the network's DHCP server: reserved machines get their reserved address,
    unknown machines get one from ``range`` when it is set and no answer at all when it
    is not (``dhcp-range=<network>,static``).
``proxy``
    another server hands out addresses; dnsmasq answers PXE clients (vendor class
    ``PXEClient``) with the boot part only (proxyDHCP, ``dhcp-range=<network>,proxy``).
    BIOS clients get the boot file in the proxy offer; UEFI clients are sent to port 4011
    of ``server_ip`` and get it there (dnsmasq's UEFI handling, one ``pxe-service`` per
    client architecture).

Boot loader choice, by client architecture (DHCP option 93) and user class (option 77):

* BIOS (0) -> ``undionly.kpxe``; x86-64 UEFI (7, 9) -> ``ipxe.efi``; both fetched over TFTP
  from ``server_ip`` (corral's own TFTP server; dnsmasq's TFTP stays off);
* iPXE (user class ``iPXE``, or option 175 present) -> ``{http_url}/boot/ipxe``. dnsmasq
  cannot put the client's MAC into a boot file name, so this is one generic entry script
  for every machine; corral's HTTP server serves it and it chains to
  ``{http_url}/boot/${net0/mac}.ipxe``. The iPXE entry wins over the architecture
  entries: those carry ``tag:!ipxe``, and the iPXE line comes last as well (dnsmasq uses
  the last ``dhcp-boot`` line whose tags all match).

Files, all in ``state_dir``: ``dnsmasq.conf`` (main configuration, read once at start),
``dhcp-hosts`` (the reservations: a ``dhcp-hostsfile``, which dnsmasq re-reads on SIGHUP;
it does not re-read its main configuration), ``dnsmasq.leases``, ``dnsmasq.pid`` and
``dnsmasq.log`` (dnsmasq's own log, which corral reads from a pipe as dnsmasq writes it:
the DHCP boot steps come from there, :mod:`corral.serve.dhcplog`). dnsmasq drops root
privileges after start-up (to the account ``dnsmasq``, or ``nobody`` where there is none),
and it reads the hosts file as that user: every other file it opens while still root. So
the hosts file may live apart, in ``hosts_dir`` (``corral serve`` uses one under
``/run/corral``), owned by that user and readable by it alone, and ``state_dir`` is then
private (0700); without ``hosts_dir``, ``state_dir`` and its parents must be readable and
searchable by that user.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from corral.errors import CommandFailed, CorralError, InvalidValue
from corral.files import write_atomic
from corral.run import spawn, stop
from corral.serve.dhcplog import DhcpAnswer, LogPump

log = logging.getLogger(__name__)

BIOS_LOADER = "undionly.kpxe"
UEFI_LOADER = "ipxe.efi"
IPXE_ENTRY_PATH = "/boot/ipxe"

CONF_NAME = "dnsmasq.conf"
HOSTS_NAME = "dhcp-hosts"
LEASE_NAME = "dnsmasq.leases"
PID_NAME = "dnsmasq.pid"
LOG_NAME = "dnsmasq.log"

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
RELOAD_TIMEOUT = 5.0
LOG_ROTATE_BYTES = 8 * 1024 * 1024

_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$", re.IGNORECASE)
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_LEASE = re.compile(r"^(\d+[smhdw]?|infinite)$")
# Characters that would end or split a value in a dnsmasq configuration line.
_UNSAFE = re.compile(r"[\s,\"'#\\]")


# --------------------------------------------------------------------------- model


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidValue(f"{what}: not an IPv4 address: {value!r}") from None


def _network(server_ip: str, netmask: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Interface(f"{server_ip}/{netmask}").network
    except ValueError:
        raise InvalidValue(f"netmask: not an IPv4 netmask: {netmask!r}") from None


@dataclass(frozen=True)
class DhcpConfig:
    """What corral's DHCP service needs to know; validated on construction."""

    mode: Literal["full", "proxy"]
    interface: str
    server_ip: str
    http_url: str
    tftp_port: int = 69
    """Informational: corral's own TFTP server listens there; DHCP cannot announce a port."""
    range: tuple[str, str] | None = None
    netmask: str = "255.255.255.0"
    router: str | None = None
    dns: list[str] = field(default_factory=list)
    lease_time: str = "1h"
    log_dhcp: bool = False
    """Keep dnsmasq's per-packet details (options sent, tags) in ``dnsmasq.log``; corral
    reads them in any case, for the boot file of each answer."""
    # Send IPv6 router advertisements for the interface's own prefix (no DHCPv6): iPXE
    # otherwise waits ~13 s for one on a boot network without an IPv6 router.
    ipv6_ra: bool = False
    state_dir: Path = field(kw_only=True)
    # Where the hosts file goes when ``state_dir`` is not reachable by dnsmasq's user:
    # a directory of corral's that the user may search, the file the user's alone.
    hosts_dir: Path | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "proxy"):
            raise InvalidValue(f"mode: expected 'full' or 'proxy', got {self.mode!r}")
        if not _IFNAME.match(self.interface):
            raise InvalidValue(f"interface: not an interface name: {self.interface!r}")
        server = _ipv4(self.server_ip, "server_ip")
        net = _network(self.server_ip, self.netmask)
        if server in (net.network_address, net.broadcast_address):
            raise InvalidValue(f"server_ip: {server} is not a host address of {net}")
        if not re.match(r"^https?://[^/]", self.http_url) or _UNSAFE.search(self.http_url):
            raise InvalidValue(
                f"http_url: expected http(s)://host[:port][/path] with no spaces, commas "
                f"or quotes, got {self.http_url!r}"
            )
        if not 0 < self.tftp_port < 65536:
            raise InvalidValue(f"tftp_port: out of range: {self.tftp_port}")
        if self.range is not None:
            if self.mode == "proxy":
                raise InvalidValue(
                    "range: proxy mode hands out no addresses",
                    "drop the range, or use mode 'full'",
                )
            start, end = (_ipv4(a, "range") for a in self.range)
            if start not in net or end not in net or start > end:
                raise InvalidValue(f"range: {start}-{end} is not an address range inside {net}")
        if self.router is not None:
            _ipv4(self.router, "router")
        for server_addr in self.dns:
            _ipv4(server_addr, "dns")
        if not _LEASE.match(self.lease_time):
            raise InvalidValue(
                f"lease_time: expected a number with an optional unit s/m/h/d/w, or "
                f"'infinite', got {self.lease_time!r}"
            )
        state_dir = Path(self.state_dir).absolute()
        if _UNSAFE.search(str(state_dir)):
            raise InvalidValue(f"state_dir: no spaces, commas or quotes allowed: {state_dir}")
        object.__setattr__(self, "state_dir", state_dir)
        if self.hosts_dir is not None:
            hosts_dir = Path(self.hosts_dir).absolute()
            if _UNSAFE.search(str(hosts_dir)):
                raise InvalidValue(f"hosts_dir: no spaces, commas or quotes allowed: {hosts_dir}")
            object.__setattr__(self, "hosts_dir", hosts_dir)

    @property
    def hosts_file(self) -> Path:
        return (self.hosts_dir or self.state_dir) / HOSTS_NAME

    @property
    def network(self) -> ipaddress.IPv4Network:
        return _network(self.server_ip, self.netmask)

    @property
    def ipxe_url(self) -> str:
        """The URL handed to iPXE clients: corral's generic entry script."""
        return self.http_url.rstrip("/") + IPXE_ENTRY_PATH


LOADER_FILES = {"ipxe": "", "pxelinux": "pxelinux.0", "grub": "grubnetx64.efi"}


@dataclass(frozen=True)
class Reservation:
    """A fixed address (and host name) for one MAC; the MAC is stored as aa:bb:cc:dd:ee:ff."""

    mac: str
    ip: str
    hostname: str
    # The loader this machine network-boots: ipxe (default), pxelinux or grub (UEFI).
    loader: str = "ipxe"

    def __post_init__(self) -> None:
        if self.loader not in LOADER_FILES:
            raise InvalidValue(f"loader: {self.loader!r} is not one of {', '.join(LOADER_FILES)}")
        if not _MAC.match(self.mac):
            raise InvalidValue(f"mac: not a MAC address: {self.mac!r}")
        object.__setattr__(self, "mac", self.mac.lower().replace("-", ":"))
        _ipv4(self.ip, f"ip of {self.mac}")
        if not _LABEL.match(self.hostname):
            raise InvalidValue(
                f"hostname: {self.hostname!r} is not a host name (letters, digits, '-', "
                f"at most 63 characters, no dots)"
            )


# --------------------------------------------------------------------------- rendering


def render_config(cfg: DhcpConfig) -> str:
    """dnsmasq's main configuration for ``cfg`` (deterministic; read only at start)."""
    state = cfg.state_dir
    net = cfg.network
    server = cfg.server_ip
    lines = [
        f"# corral DHCP service ({cfg.mode} mode), generated: do not edit.",
        "# dnsmasq reads this file only at start; the reservations are in the hosts file,",
        "# which it re-reads on SIGHUP.",
        "port=0",
        f"interface={cfg.interface}",
        "bind-interfaces",
        "keep-in-foreground",
        "log-facility=-",
        "no-hosts",
        "no-resolv",
        f"pid-file={state / PID_NAME}",
        f"dhcp-leasefile={state / LEASE_NAME}",
        f"dhcp-hostsfile={cfg.hosts_file}",
        f"user={dnsmasq_user()}",
    ]
    if cfg.mode == "full":
        lines.append("dhcp-authoritative")
        if cfg.range is not None:
            start, end = cfg.range
            lines.append(f"dhcp-range={start},{end},{cfg.netmask},{cfg.lease_time}")
        else:
            lines.append(f"dhcp-range={net.network_address},static,{cfg.netmask},{cfg.lease_time}")
        # Without a value the option is not sent: dnsmasq would offer itself as router.
        lines.append(f"dhcp-option=option:router{',' + cfg.router if cfg.router else ''}")
        if cfg.dns:
            lines.append(f"dhcp-option=option:dns-server,{','.join(cfg.dns)}")
    else:
        lines.append(f"dhcp-range={net.network_address},proxy,{cfg.netmask}")
    # always: only the details name the boot file that tells a network boot's DHCP
    # from an operating system's (LogPump leaves them out of the file unless log_dhcp)
    lines.append("log-dhcp")
    if cfg.ipv6_ra:
        lines += ["enable-ra", f"dhcp-range=::,constructor:{cfg.interface},ra-only"]
    lines += [
        f"# Boot loaders come from corral's TFTP server on {server} (port {cfg.tftp_port}).",
        "dhcp-match=set:bios,option:client-arch,0",
        "dhcp-match=set:efi64,option:client-arch,7",
        "dhcp-match=set:efi64,option:client-arch,9",
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:ipxe,175",
    ]
    if cfg.mode == "proxy":
        # proxyDHCP answers only when a pxe-service exists; UEFI clients get their file
        # from the port 4011 answer of the single service matching their architecture.
        lines += [
            f'pxe-service=tag:!ipxe,x86PC,"corral iPXE (BIOS)",{BIOS_LOADER},{server}',
            f'pxe-service=tag:!ipxe,BC_EFI,"corral iPXE (UEFI)",{UEFI_LOADER},{server}',
            f'pxe-service=tag:!ipxe,x86-64_EFI,"corral iPXE (UEFI)",{UEFI_LOADER},{server}',
        ]
    lines += [
        "# The last dhcp-boot line whose tags all match wins: iPXE last.",
        f"dhcp-boot=tag:bios,tag:!ipxe,{BIOS_LOADER},,{server}",
        f"dhcp-boot=tag:efi64,tag:!ipxe,{UEFI_LOADER},,{server}",
        f"dhcp-boot=tag:ipxe,{cfg.ipxe_url},,{server}",
        "# Machines whose reservation names another loader get it, iPXE ROM or not.",
        f"dhcp-boot=tag:pxelinux,{LOADER_FILES['pxelinux']},,{server}",
        f"dhcp-boot=tag:grub,{LOADER_FILES['grub']},,{server}",
    ]
    return "\n".join(lines) + "\n"


def render_hosts(reservations: Iterable[Reservation]) -> str:
    """The dhcp-hostsfile: one ``mac,ip,hostname`` line per reservation, sorted by address."""
    items = sorted(set(reservations), key=lambda r: (ipaddress.IPv4Address(r.ip), r.mac))
    seen: dict[str, Reservation] = {}
    for r in items:
        for key in (r.mac, r.ip, r.hostname.lower()):
            other = seen.setdefault(key, r)
            if other is not r:
                raise InvalidValue(
                    f"reservations {other.mac} ({other.ip}, {other.hostname}) and {r.mac} "
                    f"({r.ip}, {r.hostname}) share {key}"
                )
    return "".join(
        f"{r.mac},{'' if r.loader == 'ipxe' else f'set:{r.loader},'}{r.ip},{r.hostname}\n"
        for r in items
    )


def dnsmasq_user() -> str:
    """The account dnsmasq drops root privileges to: its own where there is one, rather
    than ``nobody``, which other daemons share."""
    try:
        pwd.getpwnam("dnsmasq")
    except KeyError:
        return "nobody"
    return "dnsmasq"


# --------------------------------------------------------------------------- back ends


class DhcpBackend(Protocol):
    """What corral needs from a DHCP server it supervises."""

    @property
    def running(self) -> bool: ...

    def start(self, reservations: Iterable[Reservation] = ()) -> None:
        """Write the configuration and start the server; raise if it does not come up."""

    def reload(self, reservations: Iterable[Reservation]) -> bool:
        """Apply a new set of reservations without a restart; True if anything changed."""

    def stop(self) -> None:
        """Stop the server (no error if it is not running)."""

    def check(self) -> bool:
        """Restart the server if it died; True if it was restarted."""


class Dnsmasq:
    """dnsmasq as a supervised child process (kept in the foreground).

    ``netns``: run it inside that network namespace (``ip netns exec``), for tests.
    ``on_answer``: given each answer dnsmasq logs, from the thread reading its log; it must
    not block.
    """

    def __init__(
        self,
        cfg: DhcpConfig,
        netns: str | None = None,
        on_answer: Callable[[DhcpAnswer], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.netns = netns
        self.on_answer = on_answer
        self._pump: LogPump | None = None
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reservations: tuple[Reservation, ...] = ()
        self._wanted = False  # started and not stopped: check() keeps it running
        self._log_offset = 0  # where the current process's log starts

    # paths

    @property
    def conf_path(self) -> Path:
        return self.cfg.state_dir / CONF_NAME

    @property
    def hosts_path(self) -> Path:
        return self.cfg.hosts_file

    @property
    def lease_path(self) -> Path:
        return self.cfg.state_dir / LEASE_NAME

    @property
    def log_path(self) -> Path:
        return self.cfg.state_dir / LOG_NAME

    @property
    def argv(self) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, "dnsmasq", f"--conf-file={self.conf_path}"]

    # state

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id of dnsmasq (``ip netns exec`` execs it, so it is that one)."""
        return self._proc.pid if self.running and self._proc else None

    # life cycle

    def start(self, reservations: Iterable[Reservation] = ()) -> None:
        if self.running:
            raise CorralError(f"dnsmasq is already running (pid {self.pid})")
        self._wanted = False
        self._start(tuple(reservations))
        self._wanted = True

    def _start(self, reservations: tuple[Reservation, ...]) -> None:
        conf, hosts = render_config(self.cfg), render_hosts(reservations)
        self._prepare_dirs()
        write_atomic(self.conf_path, conf, 0o600, durable=True)  # read at start, as root
        self._write_hosts(hosts)
        self._reservations = reservations
        self._spawn()

    def reload(self, reservations: Iterable[Reservation]) -> bool:
        if not self._wanted:
            raise CorralError("dnsmasq is not started", "start the DHCP service first")
        reservations = tuple(reservations)
        text = render_hosts(reservations)
        self._reservations = reservations
        try:
            unchanged = self.hosts_path.read_text(encoding="utf-8") == text
        except FileNotFoundError:
            unchanged = False
        if unchanged and self.running:
            return False
        self._write_hosts(text)
        if not self.check():
            self._sighup()
        return True

    def stop(self) -> None:
        self._wanted = False
        self._terminate()
        if self.cfg.hosts_dir is not None:
            shutil.rmtree(self.cfg.hosts_dir, ignore_errors=True)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop(proc, STOP_TIMEOUT, name="dnsmasq")
        self._end_pump()

    def _end_pump(self) -> None:
        """Wait for the log reader to take dnsmasq's last lines (it ends at their end)."""
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.join(timeout=STOP_TIMEOUT)

    def check(self) -> bool:
        if not self._wanted or self.running:
            return False
        proc, self._proc = self._proc, None
        if proc is None:  # an earlier restart failed
            why = "its last restart failed"
        else:
            code = proc.wait()
            why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        self._end_pump()
        log.warning(
            "dnsmasq died (%s); restarting it. Its last words: %s",
            why,
            self._log_tail(self._log_offset) or "(none)",
        )
        self.restarts += 1
        self._start(self._reservations)
        return True

    def __enter__(self) -> Dnsmasq:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # internals

    def _hosts_owner(self) -> tuple[int, int] | None:
        """Who must own the hosts file: dnsmasq's user, when the file is in ``hosts_dir``
        (and corral is root, so that dnsmasq drops privileges at all)."""
        if self.cfg.hosts_dir is None or os.geteuid() != 0:
            return None
        account = pwd.getpwnam(dnsmasq_user())
        return account.pw_uid, account.pw_gid

    def _prepare_dirs(self) -> None:
        separate = self.cfg.hosts_dir is not None
        # private when dnsmasq need not reach into it after dropping root
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700 if separate else 0o777)
        if self.cfg.hosts_dir is None:
            return
        self.cfg.state_dir.chmod(0o700)
        hosts_dir = self.cfg.hosts_dir
        if not hosts_dir.parent.is_dir():
            hosts_dir.parent.mkdir(parents=True)
            hosts_dir.parent.chmod(0o711)  # searchable, not listable
        # corral's (dnsmasq may not put files or links there), searchable by dnsmasq
        hosts_dir.mkdir(mode=0o711, exist_ok=True)
        hosts_dir.chmod(0o711)

    def _write_hosts(self, text: str) -> None:
        if self.cfg.hosts_dir is None:  # read through a public state_dir
            write_atomic(self.hosts_path, text, 0o644, durable=True)
        else:  # readable by dnsmasq's user alone
            write_atomic(self.hosts_path, text, 0o600, self._hosts_owner(), durable=True)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, offset: int, lines: int = 5) -> str:
        return " | ".join(self._log_since(offset).strip().splitlines()[-lines:])

    def _spawn(self) -> None:
        if self._log_size() > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_name(LOG_NAME + ".1"))
        offset = self._log_size()
        proc = spawn(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        self._pump = LogPump(
            proc.stdout, self.log_path, keep_details=self.cfg.log_dhcp, on_answer=self.on_answer
        )
        self._pump.start()
        self._proc, self._log_offset = proc, offset
        try:
            self._await_hosts_read(offset, START_TIMEOUT, starting=True)
        except BaseException:
            self._terminate()
            raise
        log.info(
            "dnsmasq (pid %d) serving DHCP (%s mode) on %s",
            proc.pid,
            self.cfg.mode,
            self.cfg.interface,
        )

    def _sighup(self) -> None:
        assert self._proc is not None
        offset = self._log_size()
        self._proc.send_signal(signal.SIGHUP)
        self._await_hosts_read(offset, RELOAD_TIMEOUT, starting=False)
        log.info("dnsmasq (pid %d) re-read %s", self._proc.pid, self.hosts_path)

    def _await_hosts_read(self, offset: int, timeout: float, *, starting: bool) -> None:
        """Wait until dnsmasq logs that it read the hosts file, the last step of start-up
        and all a SIGHUP makes it do here; raise if it exits or cannot read the file."""
        proc = self._proc
        assert proc is not None
        done = f"read {self.hosts_path}\n"
        failed = f"cannot read {self.hosts_path}"
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None and self._pump is not None:
                self._pump.join(timeout=STOP_TIMEOUT)  # its last words into the file
            text = self._log_since(offset)
            if failed in text:
                raise CorralError(
                    f"dnsmasq {failed}: {self._log_tail(offset, 1)}",
                    f"dnsmasq reads it as user '{dnsmasq_user()}': give it a hosts_dir of its "
                    f"own, or make {self.hosts_path.parent} and its parents world-readable "
                    "and searchable",
                )
            if code is not None:
                err = CommandFailed(self.argv, code, self._log_since(offset))
                err.hint = (
                    "is another DHCP server listening on port 67, or is the interface "
                    f"{self.cfg.interface} missing? see {self.log_path}"
                )
                raise err
            if done in text:
                return
            if time.monotonic() > deadline:
                what = "start" if starting else "re-read its hosts file after SIGHUP"
                raise CorralError(
                    f"dnsmasq (pid {proc.pid}) did not {what} within {timeout:g} s: "
                    f"{self._log_tail(offset) or '(no output)'}",
                    f"see {self.log_path}",
                )
            time.sleep(0.02)


BACKENDS: Mapping[str, Callable[[DhcpConfig, str | None], DhcpBackend]] = {"dnsmasq": Dnsmasq}


def backend(cfg: DhcpConfig, name: str = "dnsmasq", netns: str | None = None) -> DhcpBackend:
    """The DHCP back end called ``name`` for ``cfg``."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise InvalidValue(
            f"unknown DHCP back end {name!r}", f"known: {', '.join(sorted(BACKENDS))}"
        ) from None
    return factory(cfg, netns)
