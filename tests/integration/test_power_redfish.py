"""The redfish driver against sushy-tools' Redfish emulator (its fake driver, several
systems, HTTP basic authentication): power on, off, cycle and status, the boot device set
to the network once, and each fault with its reason, the other nodes going on."""

from __future__ import annotations

import importlib.util
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.power import Bmc, power
from tests.bmc_rigs import PASSWORD, USER, RedfishRig, free_tcp_port, redfish_bmcs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("sushy_tools") is None,
        reason="needs sushy-tools (pip install -e '.[dev]')",
    ),
]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RedfishRig]:
    with redfish_bmcs(tmp_path, 4) as rig:
        yield rig


def bmc(rig: RedfishRig, i: int, **fields: object) -> Bmc:
    values: dict[str, object] = {"node": f"node{i}", "driver": "redfish", "address": rig.url,
                                 "user": USER, "password": PASSWORD, "system": rig.systems[i],
                                 **fields}  # fmt: skip
    return Bmc(**values)  # type: ignore[arg-type]


def states(bmcs: list[Bmc], want: str, seconds: float = 5.0) -> list[str | None]:
    """The nodes' states once all are ``want`` (the emulator applies a change when the
    system is next read, as a BMC takes a moment), or as they are after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        found = [o.state for o in power(bmcs, "status")]
        if all(s == want for s in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def resets(rig: RedfishRig) -> dict[str, list[str]]:
    """The reset types each system was sent, in order."""
    sent: dict[str, list[str]] = {}
    for entry in rig.journal():
        if entry["method"] == "POST" and entry["path"].endswith("/ComputerSystem.Reset"):
            system = entry["path"].split("/")[4]
            sent.setdefault(system, []).append(entry["body"]["ResetType"])
    return sent


def test_on_status_cycle_off_across_systems_with_a_network_boot_once(rig: RedfishRig) -> None:
    bmcs = [bmc(rig, i) for i in range(3)]
    assert [(o.ok, o.state) for o in power(bmcs, "status")] == [(True, "off")] * 3

    on = power(bmcs, "on", netboot=True)
    assert all(o.ok and o.why is None and o.reason is None for o in on)
    assert states(bmcs, "on") == ["on"] * 3
    boots = [e for e in rig.journal() if e["method"] == "PATCH"]
    assert sorted(e["path"] for e in boots) == sorted(
        f"/redfish/v1/Systems/{s}" for s in rig.systems[:3]
    )
    for e in boots:  # sushy sends HttpBootUri: null along
        assert e["body"]["Boot"]["BootSourceOverrideTarget"] == "Pxe"
        assert e["body"]["Boot"]["BootSourceOverrideEnabled"] == "Once"
    seen = httpx.get(f"{rig.url}/redfish/v1/Systems/{rig.systems[0]}", auth=(USER, PASSWORD)).json()
    assert seen["Boot"]["BootSourceOverrideTarget"] == "Pxe"

    cycle = power(bmcs, "cycle")
    assert all(o.ok for o in cycle)
    assert states(bmcs, "on") == ["on"] * 3

    off = power(bmcs, "off")
    assert all(o.ok for o in off)
    assert states(bmcs, "off") == ["off"] * 3

    assert resets(rig) == {s: ["On", "ForceRestart", "ForceOff"] for s in rig.systems[:3]}
    # the fourth system was left alone
    assert [o.state for o in power([bmc(rig, 3)], "status")] == ["off"]
    # on when on, and off when off, send nothing
    power(bmcs, "off")
    assert resets(rig) == {s: ["On", "ForceRestart", "ForceOff"] for s in rig.systems[:3]}


def test_a_cycle_of_a_system_that_is_off_powers_it_on(rig: RedfishRig) -> None:
    [outcome] = power([bmc(rig, 0)], "cycle")
    assert outcome.ok
    assert resets(rig) == {rig.systems[0]: ["On"]}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers: a hung BMC."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_faults_have_their_reasons_and_leave_the_other_nodes_alone(
    rig: RedfishRig, silent_port: int
) -> None:
    closed = f"http://127.0.0.1:{free_tcp_port()}"
    hung = f"http://127.0.0.1:{silent_port}"
    bmcs = [
        bmc(rig, 0),
        bmc(rig, 1, password="not-the-password"),
        bmc(rig, 2, node="ghost", system="no-such-system"),
        bmc(rig, 2, node="closed", address=closed),
        bmc(rig, 2, node="hung", address=hung),
        bmc(rig, 2, node="which", system=None),
        bmc(rig, 2),
    ]
    started = time.monotonic()
    outcomes = power(bmcs, "on", netboot=True, timeout=2)
    assert time.monotonic() - started < 2 + 2
    good, wrong_password, ghost, refused, no_answer, which, good_too = outcomes

    assert good.ok and good_too.ok
    assert states([bmc(rig, 0), bmc(rig, 2)], "on") == ["on", "on"]
    assert set(resets(rig)) == {rig.systems[0], rig.systems[2]}

    assert (wrong_password.ok, wrong_password.why, wrong_password.reason) == (
        False, "auth", f"BMC {rig.url} refused the user or password (user 'admin')",
    )  # fmt: skip
    assert (ghost.why, ghost.reason) == (
        "bmc-error",
        f"BMC {rig.url} has no /redfish/v1/Systems/no-such-system (HTTP 404): set"
        " power.system to one in /redfish/v1/Systems/",
    )
    assert (refused.why, refused.reason) == (
        "unreachable", f"BMC {closed} refused the connection: is it Redfish?",
    )  # fmt: skip
    assert no_answer.why == "timeout"
    assert no_answer.reason in (f"BMC {hung} did not answer within {s} s" for s in (1, 2))
    assert (which.why, which.reason) == (
        "config", f"BMC {rig.url} has several systems: set power.system to this node's"
        " (in /redfish/v1/Systems/)",
    )  # fmt: skip
    for outcome in outcomes:
        assert PASSWORD not in (outcome.reason or "")
