"""What a power operation is made of: a node's BMC (:class:`Bmc`), the answer for one node
(:class:`Outcome`), the per-node deadline a driver works under (:class:`Deadline`), and the
small base every driver implements (:class:`Driver`), which answers with an
:class:`Answer` or raises :class:`PowerFailure`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from corral.errors import CorralError

ACTIONS = ("on", "off", "cycle", "status")
DRIVERS = ("ipmi", "redfish", "command", "testbed", "manual")

#: The machine-readable kinds of ``Outcome.why``.
TIMEOUT = "timeout"  # the BMC (or the command) did not answer in time
UNREACHABLE = "unreachable"  # no connection: refused, no route, a name that does not resolve
AUTH = "auth"  # the BMC refused the user, the password or the user's privilege
BMC_ERROR = "bmc-error"  # the BMC answered, with an error
MANUAL = "manual"  # nothing was done: a person has to (Outcome.ok is True)
CONFIG = "config"  # the power settings are wrong or incomplete: nothing was sent
WHYS = (TIMEOUT, UNREACHABLE, AUTH, BMC_ERROR, MANUAL, CONFIG)


@dataclass(frozen=True)
class Bmc:
    """Everything one node's driver needs; the password is already decrypted.

    The password never shows: not in the repr, not in any program's argv, not in a reason.
    """

    node: str
    driver: str
    #: ipmi: host or host:port (623); redfish: a URL (http[s]://host[:port]) or a host (https)
    address: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    #: redfish: the system's path ("/redfish/v1/Systems/1") or id ("1"); None: the only one
    system: str | None = None
    #: ipmi: the lanplus cipher suite (ipmitool -C); None: 17 (see corral.power.ipmi)
    cipher_suite: int | None = None
    #: command: an argv line (shlex) with {node} and {action} placeholders
    command: str | None = None
    #: redfish: check the BMC's TLS certificate
    verify_tls: bool = False


@dataclass(frozen=True)
class Outcome:
    """What became of one node's power operation."""

    node: str
    action: str
    ok: bool
    #: "on" / "off" as the BMC reports it after the action (or for status); None: unknown
    state: str | None
    #: one line for a person when not ok (or the instruction of the manual driver)
    reason: str | None
    #: machine-readable: one of WHYS, None when ok
    why: str | None
    seconds: float
    driver: str


@dataclass(frozen=True)
class PowerContext:
    """What some drivers need beyond the node's BMC."""

    #: corral's home, for the testbed driver (None: $CORRAL_HOME or the default)
    home: Path | None = None


@dataclass(frozen=True)
class Answer:
    """A driver's answer for a node it could power (or, manual, tell about)."""

    state: str | None
    #: a line for a person even though it went well (the manual instruction, or a boot
    #: device the BMC did not take)
    note: str | None = None
    why: str | None = None


class PowerFailure(CorralError):
    """One node's power operation failed; ``why`` is one of :data:`WHYS`."""

    def __init__(self, why: str, reason: str) -> None:
        super().__init__(reason)
        self.why = why
        self.reason = reason
        self.args = (why, reason)


@dataclass(frozen=True)
class Deadline:
    """The end of one node's time: ``seconds`` after ``started`` (monotonic clock)."""

    started: float
    seconds: float

    @classmethod
    def start(cls, seconds: float) -> Deadline:
        return cls(time.monotonic(), seconds)

    @property
    def at(self) -> float:
        return self.started + self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def left(self, what: str) -> float:
        """Seconds left; a :class:`PowerFailure` (timeout) naming ``what`` when none are."""
        left = self.remaining()
        if left <= 0:
            raise PowerFailure(TIMEOUT, f"{what} did not answer within {self.seconds:g} s")
        return left


class Driver(ABC):
    """One way of powering nodes. :meth:`run` answers for one node, from a worker thread
    (several at once: a driver keeps no per-call state on itself), within ``deadline``."""

    name: ClassVar[str]

    @abstractmethod
    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        """Do ``action`` (one of ACTIONS) to ``bmc``'s node; before on and cycle, with
        ``netboot``, set its next boot (only) to the network where the BMC can. Raises
        :class:`PowerFailure` when it cannot."""
