"""The registry of power drivers, by the name a power block gives (tests add fakes with
:func:`register`)."""

from __future__ import annotations

from corral.power.command import CommandDriver
from corral.power.ipmi import IpmiDriver
from corral.power.manual import ManualDriver
from corral.power.model import Driver
from corral.power.redfish import RedfishDriver
from corral.power.testbed import TestbedDriver

#: name -> driver; the order is DRIVERS'.
REGISTRY: dict[str, Driver] = {
    "ipmi": IpmiDriver(),
    "redfish": RedfishDriver(),
    "command": CommandDriver(),
    "testbed": TestbedDriver(),
    "manual": ManualDriver(),
}


def register(name: str, driver: Driver) -> None:
    REGISTRY[name] = driver
