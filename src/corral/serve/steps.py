"""The boot steps corral serves, stored as events on the node that took them.

DHCP (dnsmasq's log, :mod:`corral.serve.dhcplog`), TFTP (each finished transfer) and the
HTTP boot routes each hand :class:`BootSteps` a :class:`Step`: what was served, to which
address or MAC. It finds the node (by MAC when the step names one: DHCP, ``01-MAC`` file
names, the per-MAC iPXE script; else by the client's reserved address) and stores the step
with :meth:`NodeStates.record`, in one small transaction. So "stuck in PXE" gets a name:
the deployment manager tells how far a node's boot got from these events.

Recording is never allowed to fail or slow a boot: an error is logged and the file is
served anyway. DHCP steps come from the thread that reads dnsmasq's output, which must
never block dnsmasq; they are queued (:meth:`BootSteps.later`) and written by a thread of
their own.

Machines in no node's interfaces are recorded too, with node "" and their MAC, but
anyone can be such a machine, with any MAC: each one's step is stored at most once a
minute per phase, and all of them together at most :data:`UNKNOWN_PER_MINUTE` times a
minute, so that a flood of made-up MACs cannot fill the database.
"""

from __future__ import annotations

import logging
import posixpath
import queue
import re
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.agent import phases
from corral.inventory import models as m
from corral.inventory.schema import normalize_mac
from corral.inventory.state import NodeStates
from corral.units import human_size

log = logging.getLogger("corral.serve")

#: Seconds in which one unknown machine's step of one phase is stored once.
UNKNOWN_EVERY = 60.0
#: Unknown machines' steps stored per minute, all machines together.
UNKNOWN_PER_MINUTE = 120
#: DHCP steps waiting for the writer; past that they are dropped (and counted in the log).
QUEUE_SIZE = 10_000
#: Addresses whose MAC corral remembers from DHCP, to name an unknown machine over TFTP.
REMEMBERED_ADDRESSES = 4096

# Network boot programs and their modules, by name; anything ending so is one too.
_LOADER_NAMES = {"pxelinux.0", "lpxelinux.0", "gpxelinux.0"}
_LOADER_ENDINGS = (".kpxe", ".pxe", ".efi", ".c32", ".0")
#: A per-machine configuration's name, once GRUB's ``grub.cfg-`` is off it.
_MAC_FILE = re.compile(r"01-([0-9a-fA-F]{2}(?:[-:][0-9a-fA-F]{2}){5})")


@dataclass(frozen=True)
class Step:
    """One boot step served: its phase, the message to store, and who took it."""

    phase: str
    message: str
    client_ip: str | None = None
    mac: str | None = None
    at: float | None = None  # when it was served, if not now (DHCP: when dnsmasq said so)


def boot_file_phase(path: str) -> str | None:
    """The boot step that serving ``path`` (relative to the TFTP root or an HTTP boot
    route) is, or None for a file that is no step of its own (GRUB's modules and fonts).

    Kernels and initrds are told apart by name: corral's own are ``vmlinuz`` and
    ``initrd.img``, the token is a ``.cpio.gz``, and distributions name their initrds
    ``initrd*`` or ``initramfs*`` (``initrd.img``, ``initrd.gz``, ``initramfs.img``)."""
    directory, _, name = path.rpartition("/")
    lower = name.lower()
    if directory == "pxelinux.cfg" or lower.startswith("grub.cfg"):
        return phases.BOOT_CONFIG
    if directory == "boot/token" or lower.startswith(("initrd", "initramfs")):
        return phases.INITRD
    if directory.startswith(("distros/", "corral/ramdisk", "corral/diskless/")):
        return phases.KERNEL
    if lower.startswith("vmlinuz"):
        return phases.KERNEL
    if lower in _LOADER_NAMES or lower.endswith(_LOADER_ENDINGS):
        return phases.LOADER
    return None


def protocol_of(phase: str, message: str) -> str | None:
    """The protocol that served a stored boot step: ``dhcp`` for DHCP's (dnsmasq's), else
    ``tftp`` or ``http`` as its message says ("ipxe.efi over TFTP (850.5 kB)"); None for
    an event that is no boot step. The event's source is who took the step (the client's
    address), so this is where a step's protocol is read back (metrics)."""
    if phase == phases.DHCP:
        return "dhcp"
    if phase not in phases.BOOT_STEPS:
        return None
    for protocol in ("tftp", "http"):
        if f" over {protocol.upper()}" in message:
            return protocol
    return None


def mac_in_name(path: str) -> str | None:
    """The MAC of a per-machine file name (``pxelinux.cfg/01-aa-bb-..``, GRUB's
    ``grub.cfg-01-aa:bb:..``), normalised; None for any other name. The TFTP server
    serves by it, and records the transfer by it."""
    found = _MAC_FILE.fullmatch(posixpath.basename(path).removeprefix("grub.cfg-"))
    if found is None:
        return None
    try:
        return normalize_mac(found.group(1).replace("-", ":"))
    except ValueError:
        return None


def tftp_step(path: str, client_ip: str, size: int, failure: str | None) -> Step | None:
    """The step a finished TFTP transfer of ``path`` was (``size``: the bytes the client
    acknowledged; ``failure``: why it ended early, None if it did not), or None for no step.

    A boot configuration that was not found is no step: pxelinux and GRUB try a list of
    names (``01-MAC``, the UUID, the address in hex, ``default``) until one is there."""
    phase = boot_file_phase(path)
    if phase is None or (phase == phases.BOOT_CONFIG and failure == "file not found"):
        return None
    what = path if phase == phases.BOOT_CONFIG else posixpath.basename(path)
    if path.startswith("boot/token/"):
        what = "token"
    if failure is None:
        message = f"{what} over TFTP ({human_size(size)})"
    elif size:
        message = f"{what} over TFTP failed after {human_size(size)}: {failure}"
    else:
        message = f"{what} over TFTP failed: {failure}"
    return Step(phase, message, client_ip, mac_in_name(path))


class BootSteps:
    """Stores the boot steps corral serves; safe to call from any thread."""

    def __init__(
        self,
        session: Callable[[], AbstractContextManager[Session]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.clock = clock
        self._lock = threading.Lock()
        self._unknown_seen: dict[tuple[str, str], float] = {}
        self._minute = (0.0, 0)  # start of the current minute, unknown steps stored in it
        self._dropped_unknown = 0
        self._macs: dict[str, str] = {}  # client address -> MAC, from DHCP acknowledgements
        self._queue: queue.Queue[tuple[Step, str] | None] = queue.Queue(QUEUE_SIZE)
        self._dropped_queued = 0
        self._writer: threading.Thread | None = None

    # -- recording ----------------------------------------------------------------------

    def record(self, step: Step, source: str | None = None) -> str | None:
        """Store ``step`` on its node; returns the node's name ("" for an unknown machine,
        None when nothing was stored: rate-limited, or the database failed, which is
        logged). ``source``: who told (default: the client's address)."""
        source = source or step.client_ip or "corral"
        for attempt in range(2):
            try:
                return self._store(step, source)
            except IntegrityError:
                # two steps of a node with no state row yet, at once: both add one; the
                # second to commit loses, and finds the row on its second try
                if attempt == 0:
                    continue
                log.exception("could not store boot step %s %r; served anyway", step.phase, step)
            except Exception:
                log.exception("could not store boot step %s %r; served anyway", step.phase, step)
                break
        return None

    def _store(self, step: Step, source: str) -> str | None:
        with self.session() as s:
            name = self._node(s, step)
            if name is None:
                mac = step.mac or self._remembered_mac(step.client_ip)
                if not self._admit_unknown(mac or step.client_ip or "?", step.phase):
                    return None
                NodeStates(s).record_unknown(mac, step.phase, step.message, source, step.at)
                return ""
            NodeStates(s).record(name, step.phase, step.message, source, at=step.at)
            return name

    def remember(self, ip: str, mac: str) -> None:
        """``ip`` was acknowledged to ``mac`` (DHCP): its later TFTP and HTTP fetches then
        name the machine's MAC, also when it is in no node's interfaces."""
        with self._lock:
            self._macs.pop(ip, None)
            self._macs[ip] = mac
            while len(self._macs) > REMEMBERED_ADDRESSES:
                self._macs.pop(next(iter(self._macs)))

    def _remembered_mac(self, ip: str | None) -> str | None:
        with self._lock:
            return self._macs.get(ip) if ip else None

    def _node(self, session: Session, step: Step) -> str | None:
        """The node that took ``step``: by its MAC when it names one (a MAC in no node's
        interfaces is an unknown machine's, whatever its address), else by its client's
        address."""
        if step.mac:
            return session.scalar(
                select(m.Node.name).join(m.Interface).where(m.Interface.mac == step.mac)
            )
        if step.client_ip:
            return session.scalar(
                select(m.Node.name).join(m.Interface).where(m.Interface.ip == step.client_ip)
            )
        return None

    def _admit_unknown(self, who: str, phase: str) -> bool:
        """Whether an unknown machine's step may be stored now (see the module's doc)."""
        now = self.clock()
        with self._lock:
            last = self._unknown_seen.get((who, phase))
            if last is not None and now - last < UNKNOWN_EVERY:
                return False
            start, count = self._minute
            if now - start >= 60:
                if self._dropped_unknown:
                    log.warning(
                        "boot steps of unknown machines: %d not stored in the last minute "
                        "(at most %d a minute)",
                        self._dropped_unknown,
                        UNKNOWN_PER_MINUTE,
                    )
                start, count, self._dropped_unknown = now, 0, 0
                self._unknown_seen = {
                    k: t for k, t in self._unknown_seen.items() if now - t < UNKNOWN_EVERY
                }
            if count >= UNKNOWN_PER_MINUTE:
                self._dropped_unknown += 1
                self._minute = (start, count)
                return False
            self._minute = (start, count + 1)
            self._unknown_seen[(who, phase)] = now
            return True

    # -- queued recording, for DHCP -------------------------------------------------------

    def later(self, step: Step, source: str) -> None:
        """Queue ``step`` for the writer thread; never blocks (a full queue drops it)."""
        try:
            self._queue.put_nowait((step, source))
        except queue.Full:
            with self._lock:
                self._dropped_queued += 1
                dropped = self._dropped_queued
            if dropped == 1 or dropped % 1000 == 0:
                log.warning("boot steps: the queue is full, %d steps not stored", dropped)

    def start(self) -> None:
        """Start the thread that stores queued steps."""
        self._writer = threading.Thread(target=self._write, name="corral-steps", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Store what is queued, then end the writer thread."""
        if self._writer is None:
            return
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._writer = None

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            self.record(*item)
