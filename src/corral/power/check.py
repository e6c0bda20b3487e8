"""The problems of a power block, each one line that names the fix: what ``node set`` and
``apply`` refuse, and what :func:`corral.power.power` answers with (why "config") rather
than sending anything to a BMC."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from corral.power.ipmi import DEFAULT_CIPHER_SUITE, MAX_CIPHER_SUITE, ipmi_target
from corral.power.model import DRIVERS
from corral.power.redfish import redfish_url

#: The fields each driver cannot do without.
REQUIRED = {
    "ipmi": ("address", "user", "password"),
    "redfish": ("address", "user", "password"),
    "command": ("command",),
    "testbed": (),
    "manual": (),
}

_WHAT = {
    "address": "the BMC's address",
    "user": "the BMC user",
    "password": "the BMC password",
    "command": "the command line to run, with {node} and {action}",
}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def check(bmc_fields: Mapping[str, Any]) -> list[str]:
    """The problems of a power block (keys as :class:`corral.power.Bmc`'s fields, without
    ``node``; keys it does not know are left to the caller); [] when it is usable."""
    driver = bmc_fields.get("driver")
    if not driver:
        return [f"the power block has no driver: set power.driver to one of {', '.join(DRIVERS)}"]
    if driver not in DRIVERS:
        return [f"unknown power driver '{driver}': use one of {', '.join(DRIVERS)}"]
    problems = [
        f"power driver {driver} needs power.{key}: set it to {_WHAT[key]}"
        for key in REQUIRED[driver]
        if bmc_fields.get(key) in (None, "")
    ]
    address = bmc_fields.get("address")
    if driver == "ipmi":
        if address:
            problems += _address_problems(ipmi_target, str(address))
        problems += _cipher_suite_problems(bmc_fields.get("cipher_suite"))
    elif driver == "redfish" and address:
        problems += _address_problems(redfish_url, str(address))
    elif driver == "command" and bmc_fields.get("command"):
        problems += _command_problems(str(bmc_fields["command"]))
    return problems


def _address_problems(parse: Any, address: str) -> list[str]:
    try:
        parse(address)
    except ValueError as exc:
        return [str(exc)]
    return []


def _cipher_suite_problems(value: Any) -> list[str]:
    if value is None:
        return []
    fix = f"use {DEFAULT_CIPHER_SUITE} (or 3 for a BMC made before about 2016)"
    if isinstance(value, bool) or not isinstance(value, int):
        return [f"power.cipher_suite '{value}' is not a number: {fix}"]
    if value == 0:
        return [f"power.cipher_suite 0 lets anyone in without a password: {fix}"]
    if not 1 <= value <= MAX_CIPHER_SUITE:
        return [f"power.cipher_suite {value} is not an IPMI cipher suite: {fix}"]
    return []


def _command_problems(line: str) -> list[str]:
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return [f"power.command cannot be split into words ({exc}): check its quotes"]
    if not words:
        return ["power.command is empty: set it to the command line to run"]
    unknown = sorted({m for m in _PLACEHOLDER.findall(line) if m not in ("node", "action")})
    if unknown:
        names = ", ".join("{" + u + "}" for u in unknown)
        return [f"power.command has unknown placeholders {names}: use {{node}} and {{action}}"]
    return []
