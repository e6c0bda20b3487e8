"""What dnsmasq says it answered, read from its log as it writes it: the DHCP boot steps.

Why the log and not dnsmasq's ``--dhcp-script``: the script runs only when a lease is
added, changed or deleted. It never sees an offer, it never runs in proxy mode (there
are no leases), and a node that PXE-boots again while its lease is still valid changes
nothing, so that boot would not be seen at all. The log has every offer, acknowledgement,
proxy offer and refusal, and corral already captures it (dnsmasq logs to its standard
error, which is a pipe that :class:`LogPump` reads).

dnsmasq runs with ``log-dhcp``, because only its per-packet details say which boot file
an answer carried: that tells a PXE ROM's or iPXE's request (a boot step) from an operating
system's (the installer's, the ramdisk's, an installed node's lease renewal every half
lease, which are no boot steps and are not stored: at a thousand nodes that would be
tens of thousands of rows a day saying nothing). The details are left out of
``dnsmasq.log`` unless the configuration asks for them.

The lines, as dnsmasq 2.90 writes them (the number is the transaction id)::

    dnsmasq-dhcp[7]: 2607067961 DHCPOFFER(br0) 10.77.0.11 52:54:00:c0:ff:01
    dnsmasq-dhcp[7]: 2607067961 bootfile name: undionly.kpxe
    dnsmasq-dhcp[7]: 2607067961 DHCPACK(br0) 10.77.0.11 52:54:00:c0:ff:01 node01
    dnsmasq-dhcp[7]: 2607067961 sent size:  9 option: 67 bootfile-name  undionly.kpxe
    dnsmasq-dhcp[7]: 1937544738 DHCPDISCOVER(br0) 52:54:00:c0:ff:99 no address available
    dnsmasq-dhcp[7]: 1800517436 PXE(br0) 52:54:00:c0:ff:01 proxy
    dnsmasq-dhcp[7]: 1800517436 bootfile name: undionly.kpxe
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from corral.agent import phases
from corral.inventory.schema import normalize_mac
from corral.serve.steps import Step

log = logging.getLogger(__name__)

#: Seconds without a line after which an answer is taken as complete (its details, if
#: any, follow it at once: dnsmasq writes one packet's lines together).
IDLE = 0.2

_LINE = re.compile(r"^dnsmasq-dhcp\[\d+\]: (?:(?P<xid>\d+) )?(?P<text>.*?)\s*$")
_PACKET = re.compile(r"^(?P<kind>DHCP[A-Z]+|PXE|BOOTP)\((?P<iface>[^)]*)\) (?P<args>.*)$")
# The boot file goes in the packet's file field, or, to a client that asks for option 67
# (OVMF's PXE, iPXE), in that option: dnsmasq logs the one or the other.
_BOOTFILE = re.compile(r"^(?:bootfile name: |sent size:\s*\d+ option:\s*67 bootfile-name\s+)(.+)$")


@dataclass(frozen=True)
class DhcpAnswer:
    """One DHCP packet dnsmasq logged: its kind (``DHCPOFFER``, ``PXE``, ...), the client's
    MAC, the address (None when the line has none), the rest of the line (host name,
    reason, ``proxy``, boot file) and the boot file it sent (None: none, or unknown)."""

    kind: str
    mac: str
    ip: str | None
    text: str
    bootfile: str | None = None
    xid: str | None = None
    at: float | None = None  # when corral read it


def parse_line(line: str) -> tuple[str | None, DhcpAnswer | str | None]:
    """(transaction id, what ``line`` says): a :class:`DhcpAnswer` for a packet line, the
    boot file for a detail that names it, or None for anything else."""
    found = _LINE.match(line)
    if found is None:
        return None, None
    xid, text = found.group("xid"), found.group("text")
    bootfile = _BOOTFILE.match(text)
    if bootfile is not None:
        return xid, bootfile.group(1).strip()
    packet = _PACKET.match(text)
    if packet is None:
        return xid, None
    words = packet.group("args").split(" ")
    ip = None
    if words and _is_ipv4(words[0]):
        ip = words.pop(0)
    if not words:
        return xid, None
    try:
        mac = normalize_mac(words[0])
    except ValueError:  # a client id or an InfiniBand address: no MAC corral knows
        return xid, None
    answer = DhcpAnswer(packet.group("kind"), mac, ip, " ".join(words[1:]).strip(), xid=xid)
    return xid, answer


def _is_ipv4(word: str) -> bool:
    try:
        ipaddress.IPv4Address(word)
    except ValueError:
        return False
    return True


def is_detail(line: str) -> bool:
    """Whether ``line`` is one of ``log-dhcp``'s per-packet details (options sent, tags),
    which ``dnsmasq.log`` keeps only when the configuration asks for them."""
    found = _LINE.match(line)
    return bool(found and found.group("xid") and not _PACKET.match(found.group("text")))


def boot_step(answer: DhcpAnswer) -> Step | None:
    """The boot step an answer is, or None when it is none (see the module's doc)."""
    kind, ip, boot = answer.kind, answer.ip, answer.bootfile
    if kind in ("DHCPOFFER", "DHCPACK"):
        if boot is None:  # an operating system's request, a lease renewal
            return None
        verb = "offered" if kind == "DHCPOFFER" else "acknowledged"
        message = f"{ip} {verb}" if kind == "DHCPOFFER" else f"{ip} {verb} ({boot})"
    elif kind == "PXE":
        # proxyDHCP: the boot part of an offer ("proxy-ignored": dnsmasq was told not to
        # answer). A BIOS client's names its loader; a UEFI client's sends it to port 4011,
        # whose answer dnsmasq logs the same way, with the loader.
        if answer.text != "proxy":
            return None
        message = f"proxy offer ({boot})" if boot else "proxy offer, boot file from port 4011"
    elif kind == "DHCPNAK":
        message = f"{ip} refused ({answer.text})" if answer.text else f"{ip} refused"
    elif kind == "DHCPDISCOVER" and answer.text:  # refused: "no address available"
        message = f"asked for an address: {answer.text}"
    else:
        return None
    return Step(phases.DHCP, message, client_ip=None, mac=answer.mac, at=answer.at)


class DhcpLogParser:
    """Turns dnsmasq's lines into answers, each with the boot file its details named.

    An answer is handed on as soon as a detail names its boot file: it is a boot step,
    and the node may be fetching that file already, so the step must not wait. Any other
    answer is complete when the next packet's lines begin, or on :meth:`flush` (the reader
    calls it when dnsmasq has been quiet for :data:`IDLE` seconds)."""

    def __init__(self) -> None:
        self._pending: DhcpAnswer | None = None

    def feed(self, line: str, at: float | None = None) -> list[DhcpAnswer]:
        """The answers ``line`` (read at ``at``) completes."""
        xid, said = parse_line(line)
        done: list[DhcpAnswer] = []
        pending = self._pending
        if pending is not None and isinstance(said, str) and xid == pending.xid:
            self._pending = None
            return [replace(pending, bootfile=said)]
        if isinstance(said, DhcpAnswer):
            said = replace(said, at=at)
        if pending is not None and (xid != pending.xid or isinstance(said, DhcpAnswer)):
            done.append(pending)
            self._pending = None
        if isinstance(said, DhcpAnswer):
            if said.xid is None:  # no details will follow
                done.append(said)
            else:
                self._pending = said
        return done

    def flush(self) -> list[DhcpAnswer]:
        pending, self._pending = self._pending, None
        return [pending] if pending is not None else []


class LogPump(threading.Thread):
    """Reads a dnsmasq's output until it exits: writes its lines to ``path`` (without the
    per-packet details unless ``keep_details``) and hands each answer to ``on_answer``,
    which must not block (dnsmasq waits while its pipe is full)."""

    def __init__(
        self,
        stream: IO[bytes],
        path: Path,
        *,
        keep_details: bool,
        on_answer: Callable[[DhcpAnswer], None] | None,
    ) -> None:
        super().__init__(name="corral-dnsmasq-log", daemon=True)
        self.stream = stream
        self.path = path
        self.keep_details = keep_details
        self.on_answer = on_answer
        self.parser = DhcpLogParser()

    def run(self) -> None:
        fd = self.stream.fileno()
        rest = b""
        try:
            with open(self.path, "ab", buffering=0) as out:
                while True:
                    ready, _, _ = select.select([fd], [], [], IDLE)
                    if not ready:
                        self._hand(self.parser.flush())
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    *lines, rest = (rest + chunk).split(b"\n")
                    self._lines(out, lines, time.time())
                if rest:
                    self._lines(out, [rest], time.time())
                self._hand(self.parser.flush())
        except Exception:
            log.exception("reading dnsmasq's log failed; DHCP boot steps are not recorded")
            while os.read(fd, 65536):  # keep dnsmasq from blocking on a full pipe
                pass
        finally:
            self.stream.close()

    def _lines(self, out: IO[bytes], lines: list[bytes], at: float) -> None:
        kept = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if self.keep_details or not is_detail(line):
                kept.append(raw + b"\n")
            self._hand(self.parser.feed(line, at))
        if kept:
            out.write(b"".join(kept))

    def _hand(self, answers: list[DhcpAnswer]) -> None:
        if self.on_answer is None:
            return
        for answer in answers:
            try:
                self.on_answer(answer)
            except Exception:
                log.exception("handling dnsmasq's answer %r failed", answer)
