"""``corral serve``: HTTP (uvicorn), TFTP and DHCP (dnsmasq) in one foreground process.

uvicorn owns the main thread and its SIGINT/SIGTERM handling; TFTP runs in its own
threads, dnsmasq is a supervised child, and a watcher thread reloads dnsmasq whenever
the inventory changes. Everything is stopped on the way out, whatever the reason.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import resource
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from corral.config import SETTINGS_BY_NAME, Settings, split_list
from corral.deploy.service import DeployService, Manager
from corral.errors import ConfigError
from corral.inventory import models as m
from corral.inventory.store import Inventory
from corral.serve.assets import api_token, prepare_tftp_root
from corral.serve.boot import BootService
from corral.serve.dhcplog import DhcpAnswer, boot_step
from corral.serve.events import Hub, Tail
from corral.serve.http import create_app
from corral.serve.steps import BootSteps

log = logging.getLogger("corral.serve")
WATCH_SECONDS = 2.0
#: Files that dnsmasq (after dropping root) must read live here, not in corral's home.
RUNTIME_DIR = Path("/run/corral")
#: Seconds open requests get to finish once corral serve is told to stop.
GRACEFUL_STOP = 5
#: Seconds an idle HTTP connection is kept open (three report intervals of a big deployment).
KEEP_ALIVE = 15
#: What the access log shows (config ``access_log``): every request; all but the agents'
#: high-rate traffic (--debug shows it); nothing.
ACCESS_LOG_MODES = SETTINGS_BY_NAME["access_log"].choices
#: The requests each installing node makes many times a second: image chunks and progress.
AGENT_TRAFFIC = re.compile(
    r"/images/[^/?]+/[^/?]+/(?:squashfs/)?chunks/[^/?]+\.bin"
    r"|/api/v1/deployments/[^/?]+/nodes/[^/?]+/progress"
)


def reservations(session: Session) -> list[tuple[str, str, str, str]]:
    """(mac, ip, hostname, loader) for each node's first interface with both a MAC and
    an IP; a bond's address goes to its first member's MAC, the NIC that network-boots."""
    out: list[tuple[str, str, str, str]] = []
    rows = session.execute(
        select(m.Node.name, m.Node.spec, m.Interface.spec)
        .join(m.Interface)
        .order_by(m.Node.name, m.Interface.position)
    )
    by_node: dict[str, list[dict[str, object]]] = {}
    loaders: dict[str, str] = {}
    for name, node_spec, spec in rows:
        by_node.setdefault(name, []).append(spec)
        loaders[name] = str(node_spec.get("boot_loader", "ipxe"))
    for name, ifaces in by_node.items():
        macs = {str(i["name"]): i.get("mac") for i in ifaces}
        taken = False
        for iface in ifaces:
            mac, ip = iface.get("mac"), iface.get("ip")
            members = iface.get("bond_members") or []
            if not mac and ip and isinstance(members, list) and members:
                mac = macs.get(str(members[0]))
            if mac and ip and not taken:
                out.append((str(mac), str(ip), name, loaders[name]))
                taken = True  # one address per node: the first that can boot
    return out


class QuietAgentTraffic(logging.Filter):
    """Drops uvicorn's access-log lines of the agents' successful chunk downloads and
    progress reports: at a hundred installing nodes they would be a hundred lines a
    second, burying the boot and admin requests. Their failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client, method, path with query, http version, status)
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        path, status = str(args[2]).partition("?")[0], args[4]
        if not isinstance(status, int) or status >= 400:
            return True
        return AGENT_TRAFFIC.fullmatch(path) is None


class MaskTokens(logging.Filter):
    """Writes ``token=***`` for the node tokens that scripts' URLs may carry in their
    query (``/scripts/NODE/post?token=...``): the access log is no place for secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and "?" in str(args[2]):
            path, _, query = str(args[2]).partition("?")
            masked = _TOKEN_PARAM.sub(r"\1***", query)
            if masked != query:
                record.args = (*args[:2], f"{path}?{masked}", *args[3:])
        return True


_TOKEN_PARAM = re.compile(r"((?:^|&)token=)[^&]*", re.IGNORECASE)


def trusted_proxies(settings: Settings) -> str:
    """The config's ``trusted_proxies`` checked, as uvicorn's ``forwarded_allow_ips``
    wants it ("" for none: then forwarded headers are never read)."""
    _check(settings, "trusted_proxies")
    return ",".join(split_list(settings.trusted_proxies))


def _check(settings: Settings, key: str) -> None:
    """Settings made in code were not checked as corral.toml's are."""
    problem = SETTINGS_BY_NAME[key].problem(getattr(settings, key), "the config")
    if problem is not None:
        raise problem


def access_log_mode(settings: Settings) -> str:
    """The config's ``access_log``; with --debug (corral's root logger at DEBUG), "quiet"
    shows everything."""
    _check(settings, "access_log")
    mode = settings.access_log
    if mode == "quiet" and logging.getLogger().isEnabledFor(logging.DEBUG):
        return "all"
    return mode


class Watcher(threading.Thread):
    """Keeps dnsmasq's reservations in step with the inventory, and dnsmasq alive."""

    def __init__(self, engine: Engine, dhcp: object) -> None:
        super().__init__(name="corral-watch", daemon=True)
        self.engine = engine
        self.dhcp = dhcp
        self.stopping = threading.Event()
        self.generation = -1

    def tick(self) -> None:
        from corral.inventory.db import transaction
        from corral.serve.dhcp import Reservation

        with transaction(self.engine) as s:
            generation = Inventory(s).generation
            if generation != self.generation:
                hosts = [Reservation(*r) for r in reservations(s)]
                self.dhcp.reload(hosts)  # type: ignore[attr-defined]
                self.generation = generation
        self.dhcp.check()  # type: ignore[attr-defined]

    def run(self) -> None:
        while not self.stopping.wait(WATCH_SECONDS):
            try:
                self.tick()
            except Exception:
                log.exception("watcher: keeping DHCP in step failed; retrying")


def _dhcp_config(settings: Settings) -> object:
    from corral.serve.dhcp import DhcpConfig

    if not settings.dhcp_interface:
        raise ConfigError("--dhcp needs --dhcp-interface", "name the interface nodes boot on")
    server_ip = settings.address
    if server_ip in ("0.0.0.0", ""):
        raise ConfigError("--dhcp needs --address: the server's IP on the boot network")
    network = ipaddress.IPv4Network(f"{server_ip}/24", strict=False)
    first_last = None
    if settings.dhcp_range:
        dhcp_range = SETTINGS_BY_NAME["dhcp_range"]
        if dhcp_range.check and dhcp_range.check(settings.dhcp_range):
            raise ConfigError(f"bad --dhcp-range '{settings.dhcp_range}'", dhcp_range.fix)
        first, _, last = settings.dhcp_range.partition(",")
        first_last = (first, last)
    return DhcpConfig(
        mode=settings.dhcp,  # type: ignore[arg-type]
        interface=settings.dhcp_interface,
        server_ip=server_ip,
        http_url=settings.server_url.rstrip("/"),
        tftp_port=settings.tftp_port,
        range=first_last,
        netmask=str(network.netmask),
        ipv6_ra=settings.dhcp_ipv6_ra,
        state_dir=settings.home / "dhcp",
        hosts_dir=dhcp_hosts_dir(settings) if os.geteuid() == 0 else None,
    )


def dhcp_hosts_dir(settings: Settings) -> Path:
    """Where dnsmasq's hosts file goes when corral runs as root: dnsmasq reads it after
    dropping root, and corral's home is private (0700). One directory per home."""
    digest = hashlib.sha256(str(settings.home.absolute()).encode()).hexdigest()[:12]
    return RUNTIME_DIR / f"dhcp-{digest}"


def dhcp_steps(steps: BootSteps) -> Callable[[DhcpAnswer], None]:
    """What to do with each answer dnsmasq logs: queue the boot step it is (from dnsmasq's
    log reader, which must not wait for the database), and remember which MAC an address
    went to, so that an unknown machine's TFTP and HTTP fetches name its MAC."""

    def on_answer(answer: DhcpAnswer) -> None:
        if answer.kind == "DHCPACK" and answer.ip:
            steps.remember(answer.ip, answer.mac)
        step = boot_step(answer)
        if step is not None:
            steps.later(step, "dnsmasq")

    return on_answer


def serve(settings: Settings, engine: Engine) -> None:
    """Serve until told to stop. ``settings``: the config's with corral serve's options in
    place (:func:`corral.config.with_serve_options`), for every part alike."""
    dhcp_modes = SETTINGS_BY_NAME["dhcp"]
    if settings.dhcp not in dhcp_modes.choices:
        raise ConfigError(f"bad --dhcp '{settings.dhcp}'", dhcp_modes.use_choices)
    access_log = access_log_mode(settings)
    proxies = trusted_proxies(settings)
    service = BootService(settings, engine)
    deploy = DeployService(settings, service.session, service.authorize)
    hub = Hub()
    app = create_app(service, settings.api_token or api_token(settings.home), deploy, hub)
    manager = Manager(deploy)
    tail = Tail(hub, service.session, settings.event_retention_days)
    tftp = None
    dhcp = None
    watcher = None
    quiet = QuietAgentTraffic()
    masked = MaskTokens()
    access_logger = logging.getLogger("uvicorn.access")
    access_logger.addFilter(masked)
    if access_log == "quiet":
        access_logger.addFilter(quiet)
    try:
        service.steps.start()
        if settings.tftp_port:
            from corral.serve.tftp import TftpServer

            root = settings.home / "tftpboot"
            prepare_tftp_root(root)
            tftp = TftpServer(
                root,
                service.tftp_resolve,
                host=settings.address,
                port=settings.tftp_port,
                on_done=service.tftp_done,
            )
            try:
                tftp.start()
            except OSError as exc:
                raise _cannot_listen("TFTP", settings.address, settings.tftp_port, exc) from None
            log.info("TFTP on %s:%d, root %s", settings.address, tftp.port, root)
        if settings.dhcp != "off":
            from corral.serve.dhcp import Dnsmasq

            dhcp = Dnsmasq(
                _dhcp_config(settings),  # type: ignore[arg-type]
                on_answer=dhcp_steps(service.steps),
            )
            watcher = Watcher(engine, dhcp)
            dhcp.start([])
            watcher.tick()
            watcher.start()
            log.info("DHCP (%s) on %s", settings.dhcp, settings.dhcp_interface)
        manager.start()
        tail.start()
        # log_config=None: uvicorn's loggers go to corral's root handler, in one format
        # (its own dictConfig would also remove the handlers corral set up).
        config = uvicorn.Config(
            app,
            host=settings.address,
            port=settings.http_port,
            log_config=None,
            access_log=access_log != "off",
            # a node pulling an image over a slow link must not hold a stop for minutes:
            # its agent resumes with a Range request once corral is back
            timeout_graceful_shutdown=GRACEFUL_STOP,
            # agents keep one connection for their progress reports, sent up to
            # REPORT_MAX (5 s) apart: uvicorn's 5 s would close it just before each one
            timeout_keep_alive=KEEP_ALIVE,
            # a node's install secrets go to its reserved address: X-Forwarded-For from
            # anyone but a proxy the site named would let a client claim that address
            proxy_headers=bool(proxies),
            forwarded_allow_ips=proxies or [],
        )
        _more_open_files()
        _Server(config).run(sockets=[_listen(settings.address, settings.http_port)])
    finally:
        if tail.is_alive():
            tail.stop()
        if manager.is_alive():
            manager.stop()
        if watcher is not None and watcher.is_alive():  # not started if dnsmasq failed
            watcher.stopping.set()
            watcher.join(timeout=5)
        if dhcp is not None:
            dhcp.stop()
        if tftp is not None:
            tftp.stop()
        service.steps.stop()
        access_logger.removeFilter(quiet)
        access_logger.removeFilter(masked)
        log.info("corral serve stopped")


#: Open files corral serve asks for: every node of a deployment holds a connection for its
#: progress reports (kept alive) and another while it fetches a chunk, and the usual soft
#: limit, 1,024, is short of a thousand nodes.
OPEN_FILES = 65536


def _more_open_files() -> None:
    """Raise the soft limit of open files to :data:`OPEN_FILES`, or the hard limit if lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        log.info("open files: up to %d (from %d)", want, soft)


class _Server(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM/SIGINT once it has shut down: that would kill
    the process before corral stops TFTP and dnsmasq."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _cannot_listen(what: str, address: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot listen for {what} on {address}:{port}: {exc.strerror}",
        f"stop whatever uses that port, or choose another with --{what.lower()}-port",
    )


def _listen(address: str, port: int) -> socket.socket:
    """The HTTP socket, bound here so that a busy port is a clear error, not a log line."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise _cannot_listen("HTTP", address, port, exc) from None
    sock.listen(2048)
    return sock
