"""corral.power without BMCs: the batch (pool bound, per-node deadline, order, a driver's
exception), the ipmi driver's commands through a fake runner, the command and manual
drivers, and check()."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.errors import InvalidValue
from corral.power import (
    REGISTRY,
    Answer,
    Bmc,
    Deadline,
    Driver,
    Outcome,
    PowerContext,
    PowerFailure,
    check,
    power,
)
from corral.power.batch import GRACE
from corral.power.command import command_argv
from corral.power.ipmi import IpmiDriver, ipmi_target, ipmitool_failure
from corral.power.redfish import redfish_url

SECRET = "hunter2-Secret"


class Recorder(Driver):
    """A fake driver: sleeps ``delay`` (per node if a dict), counts how many run at once,
    raises for the nodes in ``broken``, hangs (until ``release``) for those in ``hangs``."""

    name = "fake"

    def __init__(
        self,
        delay: float | dict[str, float] = 0.0,
        broken: Sequence[str] = (),
        hangs: Sequence[str] = (),
    ) -> None:
        self.delay = delay
        self.broken = set(broken)
        self.hangs = set(hangs)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls: list[tuple[str, str, bool]] = []

    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.calls.append((bmc.node, action, netboot))
        try:
            if bmc.node in self.hangs:
                self.release.wait(30)
            delay = self.delay.get(bmc.node, 0.0) if isinstance(self.delay, dict) else self.delay
            time.sleep(delay)
            if bmc.node in self.broken:
                raise RuntimeError(f"driver bug while talking with password {bmc.password}")
            return Answer("on")
        finally:
            with self.lock:
                self.now -= 1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(driver: Recorder) -> Recorder:
        monkeypatch.setitem(REGISTRY, "fake", driver)
        return driver

    return install


def nodes(n: int, driver: str = "fake") -> list[Bmc]:
    return [Bmc(f"n{i:03d}", driver, password=SECRET) for i in range(n)]


# --- the batch -------------------------------------------------------------------------


def test_never_more_than_pool_at_once_and_outcomes_in_input_order(fake: Any) -> None:
    driver = fake(Recorder(delay=0.05))
    bmcs = nodes(24)
    outcomes = power(bmcs, "cycle", pool=4, netboot=True)
    assert driver.most == 4
    assert [o.node for o in outcomes] == [b.node for b in bmcs]
    assert all(o.ok and o.state == "on" and o.action == "cycle" for o in outcomes)
    assert sorted(driver.calls) == sorted((b.node, "cycle", True) for b in bmcs)


def test_outcomes_follow_the_input_order_not_the_finishing_order(fake: Any) -> None:
    fake(Recorder(delay={"n000": 0.3, "n001": 0.2, "n002": 0.0}))
    done: list[str] = []
    outcomes = power(nodes(3), "on", on_done=lambda o: done.append(o.node))
    assert [o.node for o in outcomes] == ["n000", "n001", "n002"]
    assert done == ["n002", "n001", "n000"]


def test_a_hanging_driver_gets_timeout_and_the_call_returns_in_about_the_timeout(
    fake: Any,
) -> None:
    driver = fake(Recorder(delay=0.05, hangs=["n001"]))
    try:
        started = time.monotonic()
        outcomes = power(nodes(4), "status", pool=2, timeout=0.5)
        took = time.monotonic() - started
    finally:
        driver.release.set()
    assert 0.5 <= took < 0.5 + GRACE + 0.5
    hung = outcomes[1]
    assert (hung.ok, hung.why, hung.state) == (False, "timeout", None)
    assert hung.reason == "the fake driver did not answer within 0.5 s"
    assert all(o.ok for i, o in enumerate(outcomes) if i != 1)


def test_the_deadline_counts_from_a_nodes_own_start_not_the_calls(fake: Any) -> None:
    # 6 nodes of 0.3 s through one slot: 1.8 s in all, each well within its 1 s
    fake(Recorder(delay=0.3))
    outcomes = power(nodes(6), "on", pool=1, timeout=1.0)
    assert all(o.ok for o in outcomes)
    assert all(0.25 < o.seconds < 0.9 for o in outcomes)


def test_a_drivers_exception_is_that_nodes_outcome_with_the_password_masked(
    fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "corral.power")
    fake(Recorder(broken=["n001"]))
    outcomes = power(nodes(3), "off")
    assert [o.ok for o in outcomes] == [True, False, True]
    broken = outcomes[1]
    assert broken.why == "bmc-error"
    assert broken.reason == (
        "the fake driver failed: RuntimeError: driver bug while talking with password ***"
    )
    assert "where the fake driver failed" in caplog.text
    assert SECRET not in caplog.text


def test_on_done_sees_every_node_once_and_its_exception_stops_nothing(fake: Any) -> None:
    fake(Recorder(delay=0.01))
    seen: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        seen.append(outcome)
        raise ValueError("the caller's bug")

    outcomes = power(nodes(10), "on", pool=3, on_done=report)
    assert sorted(o.node for o in seen) == [o.node for o in outcomes]


def test_bad_configuration_is_an_outcome_and_a_bad_action_an_error() -> None:
    bmcs = [Bmc("a", "ipmi", user="admin", password=SECRET), Bmc("b", "telnet")]
    a, b = power(bmcs, "on")
    assert (a.ok, a.why) == (False, "config")
    assert a.reason == "power driver ipmi needs power.address: set it to the BMC's address"
    assert (b.ok, b.why) == (False, "config")
    assert b.reason == (
        "unknown power driver 'telnet': use one of ipmi, redfish, command, testbed, manual"
    )
    with pytest.raises(InvalidValue, match="unknown power action 'reboot'"):
        power(bmcs, "reboot")
    assert power([], "on") == []


def test_the_password_is_not_in_the_repr() -> None:
    bmc = Bmc("a", "redfish", "https://bmc", "admin", SECRET)
    assert SECRET not in repr(bmc)
    assert SECRET not in str(bmc)


def test_manual_tells_what_to_do_and_touches_nothing() -> None:
    on, off, status = (
        power([Bmc("c07", "manual")], a, netboot=True)[0] for a in ("on", "off", "status")
    )
    assert (on.ok, on.why, on.state) == (True, "manual", None)
    assert on.reason == (
        "switch c07 on yourself, and have it boot from the network (PXE): corral drives no BMC"
        " for it"
    )
    assert off.reason == "switch c07 off yourself: corral drives no BMC for it"
    assert status.state is None and status.ok


# --- ipmi, through a fake runner --------------------------------------------------------


class FakeIpmitool:
    """Answers ipmitool's argv like a BMC whose power is ``state``; keeps what it got."""

    def __init__(self, state: str = "off", fail: dict[str, tuple[int, str]] | None = None):
        self.state = state
        self.fail = fail or {}
        self.seen: list[tuple[list[str], str | None, float | None]] = []

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.seen.append((argv, input, timeout))
        words = " ".join(argv[argv.index("-v") + 1 :])
        if words in self.fail:
            code, stderr = self.fail[words]
            return subprocess.CompletedProcess(argv, code, "", stderr)
        out = ""
        if words == "chassis power status":
            out = f"Chassis Power is {self.state}\n"
        elif words.startswith("chassis power "):
            verb = words.split()[-1]
            self.state = "off" if verb == "off" else "on"
            out = f"Chassis Power Control: {verb}\n"
        return subprocess.CompletedProcess(argv, 0, out, "Loading IANA PEN Registry...\n")

    @property
    def commands(self) -> list[str]:
        return [" ".join(a[a.index("-v") + 1 :]) for a, _, _ in self.seen]


def ipmi_run(runner: FakeIpmitool, action: str, netboot: bool = False, **bmc: Any) -> Answer:
    fields = {"address": "10.0.0.5", "user": "admin", "password": SECRET, **bmc}
    return IpmiDriver(runner).run(
        Bmc("c01", "ipmi", **fields),
        action,
        netboot=netboot,
        deadline=Deadline.start(20),
        context=PowerContext(),
    )


def test_ipmitool_never_gets_the_password_in_argv_but_on_its_stdin() -> None:
    runner = FakeIpmitool("on")
    assert ipmi_run(runner, "status") == Answer("on")
    argv, stdin, timeout = runner.seen[0]
    assert SECRET not in " ".join(argv)
    assert argv[:10] == ["ipmitool", "-I", "lanplus", "-H", "10.0.0.5", "-p", "623", "-U",
                         "admin", "-f"]  # fmt: skip
    assert argv[10] == "/dev/stdin"
    assert stdin == SECRET + "\n"
    assert argv[argv.index("-C") + 1] == "17"
    assert timeout is not None and 19 < timeout <= 20


def test_ipmi_cycle_of_a_node_that_is_off_powers_it_on_after_the_boot_device() -> None:
    runner = FakeIpmitool("off")
    assert ipmi_run(runner, "cycle", netboot=True, cipher_suite=3) == Answer("on")
    assert runner.commands == [
        "chassis power status",
        "chassis bootdev pxe",
        "chassis power on",
        "chassis power status",
    ]
    assert runner.seen[0][0][runner.seen[0][0].index("-C") + 1] == "3"


def test_ipmi_cycle_of_a_node_that_is_on_cycles_it_and_off_needs_no_boot_device() -> None:
    runner = FakeIpmitool("on")
    assert ipmi_run(runner, "cycle").state == "on"
    assert runner.commands[1] == "chassis power cycle"
    runner = FakeIpmitool("on")
    assert ipmi_run(runner, "off", netboot=True).state == "off"
    assert runner.commands == ["chassis power off", "chassis power status"]


def test_ipmi_a_bmc_that_refuses_the_boot_device_still_gets_powered_with_a_note() -> None:
    refused = (1, "Set Chassis Boot Parameter 5 failed: Invalid data field in request\n")
    runner = FakeIpmitool("on", fail={"chassis bootdev pxe": refused})
    answer = ipmi_run(runner, "cycle", netboot=True, address="bmc7:6230")
    assert answer.state == "on"
    assert answer.note == (
        "BMC bmc7:6230 answered with an error: Set Chassis Boot Parameter 5 failed: Invalid"
        " data field in request; the node boots from its usual device (no network boot set)"
    )


@pytest.mark.parametrize(
    ("stderr", "why", "reason"),
    [
        ("Loading IANA PEN Registry...\n> RAKP 2 HMAC is invalid\n"
         "Error: Unable to establish IPMI v2 / RMCP+ session\n",
         "auth", "BMC 10.0.0.5:623 refused the user or password (user 'admin')"),
        ("RAKP 2 message indicates an error : unauthorized name\n"
         "Error: Unable to establish IPMI v2 / RMCP+ session\n",
         "auth", "BMC 10.0.0.5:623 refused the user or password (user 'admin')"),
        ("Get Auth Capabilities error\nError issuing Get Channel Authentication Capabilities"
         " request\nError: Unable to establish IPMI v2 / RMCP+ session\n",
         "timeout", "BMC 10.0.0.5:623 did not answer within 6.0 s"),
        ("Error in open session response message : invalid authentication algorithm\n\n"
         "Error: Unable to establish IPMI v2 / RMCP+ session\n",
         "config", "BMC 10.0.0.5:623 does not offer IPMI cipher suite 17: set"
         " power.cipher_suite to one it does ('ipmitool channel getciphers ipmi' lists them;"
         " 3 on older BMCs)"),
        ("Address lookup for bmc.invalid failed\nCould not open socket!\n",
         "unreachable", "BMC address 10.0.0.5:623 does not resolve: fix power.address"),
        ("Loading IANA PEN Registry...\nSet Chassis Power Control to Cycle failed: Command not"
         " supported in present state\n",
         "bmc-error", "BMC 10.0.0.5:623 answered with an error: Set Chassis Power Control to"
         " Cycle failed: Command not supported in present state"),
    ],
)  # fmt: skip
def test_ipmitool_failures_get_their_reason(stderr: str, why: str, reason: str) -> None:
    failure = ipmitool_failure(stderr, "10.0.0.5:623", user="admin", cipher_suite=17, elapsed=6)
    assert (failure.why, failure.reason) == (why, reason)


def test_ipmi_addresses() -> None:
    assert ipmi_target("10.0.0.5") == ("10.0.0.5", 623)
    assert ipmi_target("bmc-c01:6230") == ("bmc-c01", 6230)
    assert ipmi_target("[fd00::5]:6230") == ("fd00::5", 6230)
    assert ipmi_target("fd00::5") == ("fd00::5", 623)
    for bad in ("", "https://bmc", "bmc:99999", "bmc:x", "-oProxy", "a b"):
        with pytest.raises(ValueError):
            ipmi_target(bad)


def test_redfish_addresses() -> None:
    assert redfish_url("10.0.0.5") == "https://10.0.0.5"
    assert redfish_url("http://127.0.0.1:8000/redfish/v1") == "http://127.0.0.1:8000"
    assert redfish_url("bmc:8443") == "https://bmc:8443"
    for bad in ("ftp://bmc", "https://root:calvin@bmc", "https://bmc:port", "https://"):
        with pytest.raises(ValueError):
            redfish_url(bad)


# --- the command driver ------------------------------------------------------------------


def command(line: str, action: str, timeout: float = 10) -> Outcome:
    return power([Bmc("c 01", "command", command=line)], action, timeout=timeout)[0]


def test_command_placeholders_fill_words_not_a_shell_line() -> None:
    assert command_argv("ipmi-wrap --node {node} --do={action}", "c 01; rm", "on") == [
        "ipmi-wrap", "--node", "c 01; rm", "--do=on",
    ]  # fmt: skip


def test_command_runs_with_the_node_and_action_and_reads_the_state() -> None:
    script = "import sys; print(sys.argv[2] == 'status' and 'Off, as seen' or 'done', sys.argv[1])"
    line = f"{sys.executable} -c {script!r} {{node}} {{action}}"
    status = command(line, "status")
    assert (status.ok, status.state) == (True, "off")
    cycle = command(line, "cycle")
    assert (cycle.ok, cycle.state) == (True, None)


def test_command_failures() -> None:
    failed = command("sh -c 'echo one >&2; echo the BMC said no >&2; exit 3' {action}", "on")
    assert (failed.why, failed.reason) == (
        "bmc-error",
        "the power command (sh) exited with 3: the BMC said no",
    )
    slow = command("sh -c 'sleep 10' {action}", "on", timeout=0.3)
    assert (slow.why, slow.reason) == (
        "timeout",
        "the power command (sh) did not finish within 0.3 s",
    )
    assert slow.seconds < 2
    missing = command("/nonexistent/power {action}", "on")
    assert missing.why == "config"
    assert missing.reason == "program not found: /nonexistent/power: fix power.command"


def test_a_command_without_action_reboots_and_refuses_off_and_status() -> None:
    assert command("true {node}", "cycle").ok
    assert command("true {node}", "on").ok
    for action in ("off", "status"):
        refused = command("true {node}", action)
        assert (refused.ok, refused.why) == (False, "config")
        assert refused.reason == "the power command has no {action}: status and off need one"


# --- check() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problems"),
    [
        ({"driver": "ipmi", "address": "10.0.0.5", "user": "admin", "password": "x"}, []),
        ({"driver": "manual"}, []),
        ({"driver": "testbed"}, []),
        ({}, ["the power block has no driver: set power.driver to one of ipmi, redfish,"
              " command, testbed, manual"]),
        ({"driver": "ilo"}, ["unknown power driver 'ilo': use one of ipmi, redfish, command,"
                             " testbed, manual"]),
        ({"driver": "redfish", "address": "https://bmc"},
         ["power driver redfish needs power.user: set it to the BMC user",
          "power driver redfish needs power.password: set it to the BMC password"]),
        ({"driver": "ipmi", "address": "bmc:70000", "user": "u", "password": "p",
          "cipher_suite": 0},
         ["power.address 'bmc:70000': the port must be a number from 1 to 65535",
          "power.cipher_suite 0 lets anyone in without a password: use 17 (or 3 for a BMC"
          " made before about 2016)"]),
        ({"driver": "ipmi", "address": "bmc", "user": "u", "password": "p", "cipher_suite": 18},
         ["power.cipher_suite 18 is not an IPMI cipher suite: use 17 (or 3 for a BMC made"
          " before about 2016)"]),
        ({"driver": "redfish", "address": "https://root:calvin@bmc", "user": "u",
          "password": "p"},
         ["power.address 'https://root:calvin@bmc' holds a user: set power.user and"
          " power.password instead"]),
        ({"driver": "command"},
         ["power driver command needs power.command: set it to the command line to run, with"
          " {node} and {action}"]),
        ({"driver": "command", "command": "pdu --outlet {outlet} {action}"},
         ["power.command has unknown placeholders {outlet}: use {node} and {action}"]),
        ({"driver": "command", "command": "pdu 'unclosed {node}"},
         ["power.command cannot be split into words (No closing quotation): check its quotes"]),
    ],
)  # fmt: skip
def test_check_names_each_problem_and_its_fix(fields: dict[str, Any], problems: list[str]) -> None:
    assert check(fields) == problems


def test_power_failure_carries_why_and_reason() -> None:
    failure = PowerFailure("auth", "BMC x refused the user or password")
    assert (failure.why, failure.reason, str(failure)) == (
        "auth", "BMC x refused the user or password", "BMC x refused the user or password",
    )  # fmt: skip


def test_testbed_without_a_testbed_says_how_to_start_one(tmp_path: Path) -> None:
    context = PowerContext(home=tmp_path)
    [on] = power([Bmc("tb001", "testbed")], "on", context=context)
    assert (on.ok, on.why) == (False, "bmc-error")
    assert on.reason == "testbed: no testbed is up: start one with 'corral testbed up --nodes N'"
    [status] = power([Bmc("tb001", "testbed")], "status", context=context)
    assert (status.ok, status.state) == (True, "off")
