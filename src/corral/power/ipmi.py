"""The ``ipmi`` driver: IPMI 2.0 over the network (lanplus), through ipmitool.

Why ipmitool rather than pyghmi: it is the client BMC vendors test against and the one an
administrator already reaches for, so a failing node's reason can be checked by hand with
the same tool; it comes from Debian (``ipmitool``) and runs through corral's one door to
programs (:func:`corral.run.run`), so it needs no thread or socket machinery of its own in
corral's process, and a hung BMC is ended by killing a process. A run costs a fork and a
few milliseconds of CPU, nothing next to a BMC's answer time.

The password never reaches ipmitool's command line (which any user can read in ``ps``):
ipmitool reads it from ``-f /dev/stdin``, and corral writes it to that pipe. ``-v`` makes
ipmitool say why a session failed (a wrong password, an unknown user, a cipher suite the
BMC lacks), which its plain output does not tell apart from a BMC that does not answer.

Cipher suite 17 (HMAC-SHA256 authentication and integrity, AES-128 encryption) unless the
node's power block says otherwise: the strongest suite IPMI has, and the one recent BMCs
offer, some of them alone. Suite 3 (SHA-1, AES-128) is what older BMCs know best; suite 0
lets anyone in and is refused by :func:`corral.power.check`. A BMC without suite 17 gets
a reason (why "config") that names the setting to change, rather than a silent fallback
to a weaker one.

``cycle`` reads the power state first: a BMC refuses (or ignores) a power cycle of a node
that is off, and an administrator asking for a cycle wants the node to boot, so an off
node is powered on instead. The network boot device is set with ``chassis bootdev pxe``,
which is for the next boot only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from subprocess import CompletedProcess
from typing import Protocol

from corral.errors import CommandFailed, CorralError
from corral.power.model import (
    AUTH,
    BMC_ERROR,
    CONFIG,
    TIMEOUT,
    UNREACHABLE,
    Answer,
    Bmc,
    Deadline,
    Driver,
    PowerContext,
    PowerFailure,
)
from corral.run import run

PORT = 623
DEFAULT_CIPHER_SUITE = 17
MAX_CIPHER_SUITE = 17
#: Seconds between ipmitool's retransmissions of a request, and how many it sends again:
#: a lost UDP packet is retried, and a BMC slow to answer is not hurried.
RETRANSMIT = 2
RETRIES = 2

_STATE = re.compile(r"Chassis Power is (on|off)", re.IGNORECASE)
#: What ipmitool -v says besides the reason, on success and failure alike.
_NOISE = (
    "loading iana pen registry",
    "running get vso capabilities",
    "invalid completion code received: invalid command",
    "discovered ipmb address",
    "get hpm.x capabilities",
    "error: unable to establish ipmi v2 / rmcp+ session",
)
_CIPHER = (
    "invalid authentication algorithm",
    "invalid integrity algorithm",
    "invalid confidentiality algorithm",
    "no matching cipher suite",
    "unsupported cipher suite",
)
_AUTH = (
    "rakp 2 hmac is invalid",
    "unauthorized name",
    "invalid session id in request",
    "rakp 4 message has invalid integrity check value",
    "unauthorized role or privilege",
    "invalid role",
)
_PRIVILEGE = ("insufficient privilege", "requested privilege level exceeds")
_NO_ANSWER = (
    "get auth capabilities error",
    "error issuing get channel authentication capabilities",
    "no response from remote controller",
)


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = ...,
        timeout: float | None = ...,
        input: str | None = ...,
    ) -> CompletedProcess[str]: ...


def ipmi_target(address: str) -> tuple[str, int]:
    """(host, port) of an ipmi address: host, host:port, [v6]:port or a bare IPv6 address.
    A ValueError names what is wrong."""
    text = address.strip()
    port = str(PORT)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"power.address '{address}': write an IPv6 BMC as [addr]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if "://" in text or "/" in host:
        raise ValueError(
            f"power.address '{address}' is not a host: an ipmi BMC's address is host or host:port"
        )
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"power.address '{address}' is not a host name or IP address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"power.address '{address}': the port must be a number from 1 to 65535")
    return host, int(port)


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def ipmitool_failure(
    stderr: str, bmc: str, *, user: str, cipher_suite: int, elapsed: float
) -> PowerFailure:
    """The reason of a failed ipmitool run, from its (verbose) stderr."""
    lines = [line.strip().lstrip("> ").strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    text = "\n".join(lines).lower()
    if any(s in text for s in _CIPHER):
        return PowerFailure(
            CONFIG,
            f"BMC {bmc} does not offer IPMI cipher suite {cipher_suite}: set power.cipher_suite"
            " to one it does ('ipmitool channel getciphers ipmi' lists them; 3 on older BMCs)",
        )
    if any(s in text for s in _AUTH):
        return PowerFailure(AUTH, f"BMC {bmc} refused the user or password (user '{user}')")
    if any(s in text for s in _PRIVILEGE):
        return PowerFailure(
            AUTH, f"BMC {bmc} does not let user '{user}' control power: make it an administrator"
        )
    if "insufficient resources for session" in text:
        return PowerFailure(
            BMC_ERROR, f"BMC {bmc} has no session free: try again, or reset the BMC (mc reset cold)"
        )
    if "address lookup for" in text:
        return PowerFailure(UNREACHABLE, f"BMC address {bmc} does not resolve: fix power.address")
    if any(s in text for s in _NO_ANSWER) or "unable to establish" in text:
        return PowerFailure(TIMEOUT, f"BMC {bmc} did not answer within {seconds(elapsed)}")
    said = [line for line in lines if not line.lower().startswith(_NOISE)]
    failed = [line for line in said if "failed" in line.lower()]
    message = (failed or said or [f"ipmitool failed without saying why ({stderr.strip()!r})"])[-1]
    return PowerFailure(BMC_ERROR, f"BMC {bmc} answered with an error: {message}")


@dataclass
class _Session:
    """ipmitool runs against one node's BMC, within its deadline."""

    bmc: Bmc
    deadline: Deadline
    runner: Runner

    def __post_init__(self) -> None:
        self.host, self.port = ipmi_target(self.bmc.address or "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.label = f"{host}:{self.port}"
        self.cipher_suite = self.bmc.cipher_suite or DEFAULT_CIPHER_SUITE

    def argv(self, words: Sequence[str]) -> list[str]:
        return ["ipmitool", "-I", "lanplus", "-H", self.host, "-p", str(self.port),
                "-U", self.bmc.user or "", "-f", "/dev/stdin", "-C", str(self.cipher_suite),
                "-N", str(RETRANSMIT), "-R", str(RETRIES), "-v", *words]  # fmt: skip

    def call(self, *words: str) -> str:
        left = self.deadline.left(f"BMC {self.label}")
        try:
            proc = self.runner(
                self.argv(words), check=False, timeout=left, input=f"{self.bmc.password}\n"
            )
        except CommandFailed as exc:  # killed at the deadline
            raise PowerFailure(
                TIMEOUT, f"BMC {self.label} did not answer within {self.deadline.seconds:g} s"
            ) from exc
        except CorralError as exc:  # no ipmitool
            raise PowerFailure(
                CONFIG, f"{exc.message}: install Debian's ipmitool ('make setup' does)"
            ) from exc
        if proc.returncode != 0:
            raise ipmitool_failure(
                proc.stderr,
                self.label,
                user=self.bmc.user or "",
                cipher_suite=self.cipher_suite,
                elapsed=self.deadline.elapsed(),
            )
        return proc.stdout

    def status(self) -> str:
        out = self.call("chassis", "power", "status")
        found = _STATE.search(out)
        if not found:
            said = out.strip().splitlines()[-1:] or ["nothing"]
            raise PowerFailure(
                BMC_ERROR, f"BMC {self.label} answered the power status with '{said[0]}'"
            )
        return found.group(1).lower()

    def netboot(self) -> str | None:
        """Boot from the network next time; a note when the BMC does not take it."""
        try:
            self.call("chassis", "bootdev", "pxe")
        except PowerFailure as exc:
            if exc.why != BMC_ERROR:
                raise
            return f"{exc.reason}; the node boots from its usual device (no network boot set)"
        return None


class IpmiDriver(Driver):
    name = "ipmi"

    def __init__(self, runner: Runner = run) -> None:
        self.runner = runner

    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        session = _Session(bmc, deadline, self.runner)
        if action == "status":
            return Answer(session.status())
        verb = action
        if action == "cycle" and session.status() == "off":
            verb = "on"
        note = session.netboot() if netboot and action in ("on", "cycle") else None
        session.call("chassis", "power", verb)
        return Answer(session.status(), note)
