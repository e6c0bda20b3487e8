"""Nodes that come up out of order and seconds apart, as real machines do (their POST and
firmware take different times), on the virtual cluster with real agents: the chain stays
a chain (no node's uplink, nor the head, feeds two successors), and a multicast session
whose sender stalls for seconds early on keeps every node (none leaves for HTTP on that
transient, where the 5 s judgement of before sent them all there).

The deployment manager does not power these nodes: the test does, at its own moments.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.deploy.store import Deployments
from corral.inventory import db
from corral.testbed import cluster
from tests.conftest import corral
from tests.integration.deploybed import RANGE, add_image, check_nodes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]

#: a multicast rate at which a small image takes seconds, so that a stall can come early
CORRAL_TOML = 'multicast_max_bitrate = "8m"\n'

RECEIVED = re.compile(r"received (\S+): (\d+) bytes in (\d+) chunks, (\d+) by multicast, (\d+)")
SERVING = re.compile(r"chain: serving (\S+) \(")
HEAD_SERVES = re.compile(r"chain (\S+): the head serves (\S+) \(")


@pytest.fixture
def powered_by_test(
    testbed: cluster.Testbed,
) -> Iterator[Callable[[list[tuple[str, float]]], None]]:
    """Power the nodes on at the given moments (seconds from the call), in a background
    thread of this test; the deployment manager leaves them alone meanwhile."""
    names = [info.name for info in testbed.require_state().nodes]
    with db.inventory() as inv:
        inv.edit("node", names, {"power": {"driver": "manual"}})
    threads: list[threading.Thread] = []

    def power(moments: list[tuple[str, float]]) -> None:
        def run() -> None:
            started = time.monotonic()
            for node, at in sorted(moments, key=lambda m: m[1]):
                time.sleep(max(0.0, started + at - time.monotonic()))
                testbed.power(node, "cycle")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    try:
        yield power
    finally:
        for thread in threads:
            thread.join(30)
        for name in names:  # whatever still runs on the nodes, by their pids
            testbed.power(name, "off")
        with db.inventory() as inv:
            inv.edit("node", names, {"power": {"driver": "testbed"}})


def start(home: Path, *args: str) -> int:
    result = corral("deploy", RANGE, *args, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.split()[1].rstrip(":"))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def ended(ident: int) -> bool:
    with db.session() as s:
        return Deployments(s).get(ident).state != "running"


def outcome(ident: int) -> tuple[str, dict[str, tuple[str, str]]]:
    with db.session() as s:
        d = Deployments(s).get(ident)
        return d.state, {n.node: (n.phase, n.message) for n in d.nodes}


def console(bed: cluster.Testbed, node: str) -> str:
    path = bed.nodes_dir / node / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_nodes_up_out_of_order_make_a_chain_where_each_uplink_feeds_one(
    testbed: cluster.Testbed,
    tmp_path: Path,
    powered_by_test: Callable[[list[tuple[str, float]]], None],
) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=31, random_mb=6)
    marks = {info.name: len(console(testbed, info.name)) for info in testbed.require_state().nodes}
    serve_mark = len(testbed.serve_log.read_text(errors="replace"))
    ident = start(home, "--image", version.ref, "--transport", "chain")
    # tb004 first, tb001 fourth, 1.5 s apart: by name, tb002 would have no predecessor up
    # for 4.5 s and tb004's 1.5 s
    powered_by_test([("tb004", 0), ("tb002", 1.5), ("tb005", 3), ("tb001", 4.5), ("tb003", 6)])
    wait_until(lambda: ended(ident), 120, "the deployment to end")
    state, rows = outcome(ident)
    assert state == "done", rows
    check_nodes(testbed, version, tmp_path)
    fed: dict[str, set[str]] = {}
    for info in testbed.require_state().nodes:
        text = console(testbed, info.name)[marks[info.name] :]
        fed[info.name] = set(SERVING.findall(text))
        assert "refused us" not in text, f"{info.name} had to leave the chain"
    served = testbed.serve_log.read_text(errors="replace")[serve_mark:]
    head = {node for tag, node in HEAD_SERVES.findall(served) if tag.startswith(f"{ident}/")}
    print(f"chain with skewed starts: the head fed {head}, the nodes fed {fed}")
    assert len(head) == 1, f"the head fed {head}"
    for node, successors in fed.items():
        assert len(successors) <= 1, f"{node} fed {successors}"
    # a chain: every node but the first was fed by exactly one other
    fed_nodes = [n for successors in fed.values() for n in successors] + list(head)
    assert sorted(fed_nodes) == sorted(rows), fed


def test_a_stall_early_in_a_multicast_session_sends_nobody_to_http(
    testbed: cluster.Testbed,
    tmp_path: Path,
    powered_by_test: Callable[[list[tuple[str, float]]], None],
) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=32, random_mb=8)
    ident = start(home, "--image", version.ref, "--transport", "multicast")
    powered_by_test([("tb003", 0), ("tb001", 1), ("tb005", 2), ("tb002", 3), ("tb004", 4)])

    def receiving() -> bool:
        with db.session() as s:
            return any(n.bytes >= 1_500_000 for n in Deployments(s).get(ident).nodes)

    wait_until(receiving, 90, "the session to be under way")
    pid_file = next((home / "multicast").glob(f"d{ident}-*.pid"))
    pid = int(pid_file.read_text())
    # udp-sender stops for 6 s, as a server held by its disk does: every node sees
    # nothing, in every second of a 5 s window
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(6)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: ended(ident), 120, "the deployment to end")
    state, rows = outcome(ident)
    assert state == "done", rows
    check_nodes(testbed, version, tmp_path)
    for info in testbed.require_state().nodes:
        found = [m for m in RECEIVED.finditer(console(testbed, info.name)) if m[1] == version.ref]
        assert found, f"{info.name}: no 'received' line"
        by_http = int(found[-1][5])
        why = [line for line in console(testbed, info.name).splitlines() if "by HTTP from" in line]
        assert by_http == 0, f"{info.name} left the session for HTTP: {why[-1:]}"
