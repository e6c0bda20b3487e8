"""The ipmi driver against OpenIPMI's ipmi_sim, over lanplus on 127.0.0.1: power on, off,
cycle and status change a real process's life (see tests.bmc_rigs), the boot device
reaches the BMC, and each fault has its reason without touching the other nodes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.power import Bmc, power
from tests.bmc_rigs import IPMI_SIM, IPMITOOL, PASSWORD, USER, IpmiRig, free_udp_port, ipmi_bmcs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(IPMI_SIM is None, reason="needs ipmi_sim (apt-get install openipmi)"),
    pytest.mark.skipif(IPMITOOL is None, reason="needs ipmitool (apt-get install ipmitool)"),
]


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[IpmiRig]]:
    with ipmi_bmcs(tmp_path, 3) as rigs:
        yield rigs


def bmc(rig: IpmiRig, **fields: object) -> Bmc:
    # OpenIPMI offers cipher suites up to 3 (no SHA-256): the default, 17, is tested below
    values: dict[str, object] = {"node": rig.name, "driver": "ipmi", "address": rig.address,
                                 "user": USER, "password": PASSWORD, "cipher_suite": 3,
                                 **fields}  # fmt: skip
    return Bmc(**values)  # type: ignore[arg-type]


def wait_for(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_on_status_cycle_off_power_real_processes_on_several_bmcs(rigs: list[IpmiRig]) -> None:
    bmcs = [bmc(r) for r in rigs]
    assert [(o.ok, o.state) for o in power(bmcs, "status")] == [(True, "off")] * 3
    assert all(r.running_pid() is None for r in rigs)

    on = power(bmcs, "on", netboot=True)
    assert [(o.ok, o.state, o.why) for o in on] == [(True, "on", None)] * 3
    first = [r.running_pid() for r in rigs]
    assert all(first)
    assert [r.boot_device() for r in rigs] == ["pxe"] * 3

    assert [o.state for o in power(bmcs, "status")] == ["on"] * 3

    # ipmi_sim cycles as a BMC does: off at once, on again a second later
    cycle = power(bmcs, "cycle")
    assert all(o.ok for o in cycle)
    for rig, old in zip(rigs, first, strict=True):
        wait_for(lambda rig=rig, old=old: rig.running_pid() not in (None, old))
    assert [o.state for o in power(bmcs, "status")] == ["on"] * 3

    off = power(bmcs, "off")
    assert [(o.ok, o.state) for o in off] == [(True, "off")] * 3
    assert all(r.running_pid() is None for r in rigs)
    assert all(o.seconds < 5 for o in on + cycle + off)


def test_a_cycle_of_a_node_that_is_off_powers_it_on(rigs: list[IpmiRig]) -> None:
    [outcome] = power([bmc(rigs[0])], "cycle", netboot=True)
    assert (outcome.ok, outcome.state) == (True, "on")
    assert rigs[0].running_pid()
    assert rigs[0].boot_device() == "pxe"


def test_faults_have_their_reasons_and_leave_the_other_nodes_alone(
    rigs: list[IpmiRig],
) -> None:
    silent = f"127.0.0.1:{free_udp_port()}"  # nobody listens there
    bmcs = [
        bmc(rigs[0]),
        bmc(rigs[1], password="not-the-password"),
        bmc(rigs[2], node="nobody", address=silent),
        bmc(rigs[2], cipher_suite=None),  # 17, which OpenIPMI does not offer
        bmc(rigs[2], node="no-user", user="nobody"),
        bmc(rigs[2]),
    ]
    started = time.monotonic()
    outcomes = power(bmcs, "on", timeout=3)
    assert time.monotonic() - started < 3 + 2

    good, wrong_password, no_answer, cipher, no_user, good_too = outcomes
    assert (good.ok, good.state) == (True, "on")
    assert (good_too.ok, good_too.state) == (True, "on")
    assert rigs[0].running_pid() and rigs[2].running_pid()
    assert rigs[1].running_pid() is None

    assert (wrong_password.ok, wrong_password.why) == (False, "auth")
    assert wrong_password.reason == (
        f"BMC {rigs[1].address} refused the user or password (user 'admin')"
    )
    assert (no_user.why, no_user.reason) == (
        "auth",
        f"BMC {rigs[2].address} refused the user or password (user 'nobody')",
    )
    assert (no_answer.why, no_answer.reason) == (
        "timeout",
        f"BMC {silent} did not answer within 3 s",
    )
    assert cipher.why == "config"
    assert cipher.reason.startswith(
        f"BMC {rigs[2].address} does not offer IPMI cipher suite 17: set power.cipher_suite"
    )
    for outcome in outcomes:
        assert PASSWORD not in (outcome.reason or "")
