"""Power control: switch nodes on and off, power-cycle them, read their power state, and
set their next boot to the network, through each node's BMC, many nodes at once.

    from corral.power import Bmc, power
    outcomes = power([Bmc("c01", "ipmi", "10.0.0.5", "admin", secret)], "cycle", netboot=True)

Drivers (a node's ``power.driver``), each a module of this package:

- ``ipmi``: IPMI 2.0 lanplus through ipmitool (:mod:`corral.power.ipmi`);
- ``redfish``: a Redfish service through sushy (:mod:`corral.power.redfish`);
- ``command``: the administrator's command line (:mod:`corral.power.command`);
- ``testbed``: corral's virtual cluster, in this process (:mod:`corral.power.testbed`);
- ``manual``: nothing is sent; the outcome says what to do (:mod:`corral.power.manual`).

:func:`power` never raises for a node: each node's failure is its :class:`Outcome`, with
a reason for a person and ``why`` for a program:

    timeout       the BMC did not answer within the node's deadline
    unreachable   no connection (refused, a name that does not resolve, TLS)
    auth          the BMC refused the user, the password or the user's privilege
    bmc-error     the BMC answered with an error (or a driver failed unexpectedly)
    config        the power block is wrong or incomplete; nothing was sent
    manual        nothing was sent, a person has to act (ok is True)

:func:`check` gives the problems of a power block before it is stored.
"""

from corral.power.batch import power
from corral.power.check import check
from corral.power.drivers import REGISTRY, register
from corral.power.model import (
    ACTIONS,
    DRIVERS,
    WHYS,
    Answer,
    Bmc,
    Deadline,
    Driver,
    Outcome,
    PowerContext,
    PowerFailure,
)

__all__ = [
    "ACTIONS",
    "DRIVERS",
    "REGISTRY",
    "WHYS",
    "Answer",
    "Bmc",
    "Deadline",
    "Driver",
    "Outcome",
    "PowerContext",
    "PowerFailure",
    "check",
    "power",
    "register",
]
