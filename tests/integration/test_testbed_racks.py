"""Racks for real: 4 nodes in 2 racks behind 4 Mbit/s uplinks, 20 Mbit/s node links.

Traffic inside a rack stays off the uplink and runs at the node link's rate; traffic from
the server, or from another rack, crosses the uplink and shares its rate; ``down`` leaves
no bridge, veth or namespace, also after a failed ``up``.

The testbed's names are fixed (``ctb-*``: one testbed per machine), so these tests skip
when one is up already, use a corral home of their own, and take theirs down in a
``finally``. No corral serve: the traffic is the test's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.errors import AlreadyExists
from corral.inventory import db
from corral.run import run
from corral.testbed import cluster
from corral.testbed.netns import namespace_pid_map
from tests.conftest import corral
from tests.integration import test_testbed
from tests.integration.test_testbed import ctb_namespaces

#: the plain testbed's fixture: its own home, skipped if a testbed is up, down after
testbed = test_testbed.testbed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.name != "posix" or os.geteuid() != 0, reason="needs root for network namespaces"
    ),
]

PORT = 9100
NODE_LINK = 20e6
UPLINK = 4e6
#: What may cross an uplink while no transfer is meant to: ARP, the odd flooded frame.
QUIET = 20_000

# "serve ADDR COUNT SIZE": accept COUNT clients on ADDR, sending SIZE bytes to each at
# once, one thread each, once all COUNT are connected. "fetch ADDR": read to the end,
# print bytes, start and end (the host's monotonic clock, which network namespaces share).
# The start is the first byte's arrival, not the connect: a client that connects early
# waits for its slower-starting siblings, and that wait is no transfer.
PEER = f"""
import socket, sys, threading, time
if sys.argv[1] == "serve":
    count, size = int(sys.argv[3]), int(sys.argv[4])
    server = socket.create_server((sys.argv[2], {PORT}), backlog=count)
    print("ready", flush=True)

    def feed(conn):
        left, block = size, bytes(1 << 16)
        with conn:
            while left > 0:
                left -= conn.send(block[: min(left, len(block))])

    feeders = [threading.Thread(target=feed, args=(server.accept()[0],)) for _ in range(count)]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join()
else:
    conn = socket.create_connection((sys.argv[2], {PORT}), timeout=30)
    got = len(conn.recv(1))
    start = time.monotonic()
    while data := conn.recv(1 << 20):
        got += len(data)
    print(got, start, time.monotonic())
"""


@dataclass
class Flow:
    got: int
    start: float
    end: float

    @property
    def rate(self) -> float:
        return self.got * 8 / (self.end - self.start)


def aggregate(flows: list[Flow]) -> float:
    """Bits/s of all flows together, from the first start to the last end."""
    return sum(f.got for f in flows) * 8 / (max(f.end for f in flows) - min(f.start for f in flows))


def ns_argv(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, sys.executable, "-c", PEER, *argv]


def transfer(source: str, address: str, sinks: list[str], size: int) -> list[Flow]:
    """``size`` bytes from namespace ``source`` (listening on ``address``) to each
    namespace in ``sinks``, all at once."""
    procs: list[subprocess.Popen[str]] = []
    try:
        server = subprocess.Popen(
            ns_argv(source, "serve", address, str(len(sinks)), str(size)),
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(server)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        clients = [
            subprocess.Popen(ns_argv(sink, "fetch", address), stdout=subprocess.PIPE, text=True)
            for sink in sinks
        ]
        procs += clients
        flows = []
        for client in clients:
            out, _ = client.communicate(timeout=60)
            got, start, end = out.split()
            flows.append(Flow(int(got), float(start), float(end)))
        assert server.wait(timeout=10) == 0
        assert [f.got for f in flows] == [size] * len(sinks)
        return flows
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def moved(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    return {
        rack: (after[rack][0] - before[rack][0], after[rack][1] - before[rack][1]) for rack in after
    }


def ports_of(bridge: str) -> list[str]:
    out = run(["ip", "-n", cluster.HUB, "-j", "link", "show", "master", bridge]).stdout
    return sorted(p["ifname"] for p in json.loads(out))


def rack_links_anywhere() -> list[str]:
    """Interfaces named like the racks' in the host's namespace or a ctb one."""
    found = []
    pattern = re.compile(r"^(br-r\d+|r\d+-(core|up))$")
    for namespace in [None, *ctb_namespaces()]:
        where = ["-n", namespace] if namespace else []
        links = json.loads(run(["ip", *where, "-j", "link", "show"]).stdout)
        found += [f"{namespace}:{x['ifname']}" for x in links if pattern.match(x["ifname"])]
    return found


def assert_all_gone(bed: cluster.Testbed) -> None:
    assert ctb_namespaces() == []
    assert rack_links_anywhere() == []
    assert bed.loop_devices() == []
    assert namespace_pid_map(cluster.PREFIX) == {}
    assert not bed.state_path.exists()


def test_racks_keep_local_traffic_off_the_uplink(testbed: cluster.Testbed, home: Path) -> None:
    state = testbed.up(4, "20mbit", racks=2, rack_uplink="4mbit", disk_size="16M", serve=False)
    assert [(n.name, n.rack) for n in state.nodes] == [
        ("tb001", "r1"), ("tb002", "r1"), ("tb003", "r2"), ("tb004", "r2"),
    ]  # fmt: skip

    # The topology: the server and the uplinks on the core bridge, each rack's nodes and
    # uplink on the rack's own; each uplink shaped at both ends.
    assert ports_of("br0") == ["r1-core", "r2-core", "s0"]
    assert ports_of("br-r1") == ["r1-up", "t001", "t002"]
    assert ports_of("br-r2") == ["r2-up", "t003", "t004"]
    for port in ("r1-core", "r1-up", "r2-core", "r2-up"):
        qdisc = run(["tc", "-n", cluster.HUB, "qdisc", "show", "dev", port]).stdout
        assert "tbf" in qdisc and "rate 4Mbit" in qdisc, qdisc
    assert set(testbed.uplink_bytes()) == {"r1", "r2"}

    # Within rack r1: the node link's rate, and the uplinks barely move.
    before = testbed.uplink_bytes()
    [local] = transfer("ctb-tb001", "10.77.0.2", ["ctb-tb002"], 2_000_000)
    quiet = moved(before, testbed.uplink_bytes())
    assert 2.5 * UPLINK < local.rate < 1.25 * NODE_LINK, f"{local.rate / 1e6:.2f} Mbit/s"
    idle = max(max(quiet["r1"]), max(quiet["r2"]))
    assert idle < QUIET, quiet

    # From the server to both nodes of r1 at once: they share r1's uplink, r2's is idle.
    # Two flows from a 20 Mbit/s link into the uplink's short queue lose 40-60 % of their
    # segments to it, and now and then one waits out retransmission timeouts while the
    # other has finished, the uplink idle meanwhile (two CI runs: "2.17 Mbit/s together",
    # 1.6 MB in 5.9 s). TCP can fall short of the uplink's rate that way, never exceed
    # it: every try must stay under the cap, and the best of up to three reach it.
    totals: list[float] = []
    for _ in range(3):
        before = testbed.uplink_bytes()
        pulls = transfer("ctb-srv", "10.77.0.1", ["ctb-tb001", "ctb-tb002"], 800_000)
        crossed = moved(before, testbed.uplink_bytes())
        totals.append(aggregate(pulls))
        assert totals[-1] < 1.15 * UPLINK, f"{totals[-1] / 1e6:.2f} Mbit/s together"
        # Each alone is capped by the uplink, not its 20 Mbit/s link (the first to finish
        # leaves the other the whole uplink for a while, so each exceeds half of it).
        assert all(f.rate < 1.15 * UPLINK for f in pulls), [f"{f.rate / 1e6:.2f}" for f in pulls]
        assert 1_600_000 <= crossed["r1"][0] < 1_800_000, crossed
        assert max(crossed["r2"]) < QUIET, crossed
        if totals[-1] > 0.7 * UPLINK:
            break
    total = max(totals)
    assert total > 0.7 * UPLINK, [f"{t / 1e6:.2f} Mbit/s together" for t in totals]

    # From rack r2 to rack r1: out of one uplink, into the other, at the uplink's rate.
    before = testbed.uplink_bytes()
    [across] = transfer("ctb-tb003", "10.77.0.4", ["ctb-tb001"], 600_000)
    crossed = moved(before, testbed.uplink_bytes())
    assert 0.7 * UPLINK < across.rate < 1.15 * UPLINK, f"{across.rate / 1e6:.2f} Mbit/s"
    assert crossed["r2"][1] >= 600_000 and crossed["r1"][0] >= 600_000, crossed
    print(
        f"in rack {local.rate / 1e6:.2f} Mbit/s; server to 2 nodes {total / 1e6:.2f} Mbit/s "
        f"({', '.join(f'{f.rate / 1e6:.2f}' for f in pulls)}); across racks "
        f"{across.rate / 1e6:.2f} Mbit/s; uplinks idle within {idle} B"
    )

    # What status shows: each uplink's rate and counters, each node's rack.
    status = corral("testbed", "status", home=home)
    assert status.returncode == 0, status.stderr
    print(status.stdout)
    assert re.search(r"(?m)^r1\s+tb001\.\.tb002\s+4mbit\s+[\d,]{9,}\s+[\d,]+\s*$", status.stdout)
    assert re.search(
        r"tb003\s+10\.77\.0\.4\s+\S+\s+/dev/loop\d+\s+20mbit\s+r2\s+off", status.stdout
    )

    report = testbed.down()
    assert report.namespaces == 6
    assert_all_gone(testbed)


def test_failed_up_with_racks_takes_down_everything(testbed: cluster.Testbed) -> None:
    # Another node owns tb002's address: registering fails once the bridges, uplinks,
    # namespaces and disks exist.
    added = corral("node", "add", "other", "--ip", "10.77.0.3", home=db.settings().home)
    assert added.returncode == 0, added.stderr
    with pytest.raises(AlreadyExists, match=r"10\.77\.0\.3"):
        testbed.up(4, racks=2, rack_uplink="4mbit", disk_size="16M", serve=False)
    assert_all_gone(testbed)
