"""Benchmark: corral's BitTorrent tracker at 100, 1,000 and 10,000 nodes.

Every node of a BitTorrent deployment announces to corral's tracker every
``ANNOUNCE_INTERVAL`` seconds (10) and asks ``/pending/INFOHASH`` every
``Latecomers.ASK_EVERY`` seconds (5). The tracker runs in a thread of ``corral serve``, so
what it costs per request, times the rate of requests, is taken from the API's CPU.

Measured per N (members in racks of ``--rack-size``, lanes and all, as a deployment opens
them), in a child process that holds the real tracker (:class:`Tracker`, its HTTP server
on 127.0.0.1): its CPU seconds per announce and per ``/pending`` question, over
``--requests`` of each, sent from this process by ``--clients`` threads, each request from
the member's own loopback address (the tracker knows a node by its address). Printed:
the CPU seconds the swarm takes to open (its lanes and lane partners), the most lane
partners a member has, milliseconds of the tracker's CPU per request, and the share of
one core that N nodes at the agent's usual rates take (``N / 10 x announce + N / 5 x
pending``), and at the rates the tracker asks of a swarm that large
(``ANNOUNCES_PER_SECOND``, ``QUESTIONS_PER_SECOND``).

    .venv/bin/python bench/tracker.py [--nodes 100,1000,10000] [--rack-size 40]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote_from_bytes

# bench/ is not a package: this script runs as bench/tracker.py, beside deploy.py
from deploy import node_counts

from corral.agent.receivers.bittorrent.feed import Latecomers
from corral.deploy.transports.bittorrent_tracker import (
    ANNOUNCE_INTERVAL,
    ANNOUNCES_PER_SECOND,
    QUESTIONS_PER_SECOND,
)

INFO_HASH = bytes(range(1, 21))
SEED = "127.255.255.254"

#: The child: a tracker whose swarm has ``n`` members, answering until stdin closes. It
#: prints its port, the CPU seconds the swarm took to open, and the most lane partners a
#: member has; then, for each line it reads, its CPU seconds so far. It counts them itself
#: (nanoseconds, the request threads that ended included): /proc counts clock ticks of
#: 10 ms, and 50 announces of 0.6 ms could fall under one.
CHILD = """
import sys, time
from corral.deploy.transports.bittorrent import by_stripe
from corral.deploy.transports.bittorrent_tracker import Tracker, lanes, partners
n, rack_size = int(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from tracker import member, INFO_HASH, SEED
racks = {member(i): f"r{i // rack_size:04}" for i in range(n)}
members = list(by_stripe(racks, racks))
tracker = Tracker("127.0.0.1", 0)
start = time.process_time()
tracker.swarms.open(INFO_HASH, None, members, [SEED], racks=racks)
opened = time.process_time() - start
most = max(map(len, partners(members, lanes(members, racks), racks).values()), default=0)
print(tracker.port, opened, most, flush=True)
for _ in sys.stdin:  # each line asks for the CPU seconds so far, all threads included
    print(time.process_time(), flush=True)
tracker.stop()
"""


def member(i: int) -> str:
    """Member ``i``'s address: one of its own in 127.0.0.0/8 (all of it is loopback)."""
    return f"127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def announce_path(i: int) -> str:
    peer = b"-LT2110-" + i.to_bytes(12, "big")
    return (
        f"/announce?info_hash={quote_from_bytes(INFO_HASH)}&peer_id={quote_from_bytes(peer)}"
        f"&port=6881&uploaded=0&downloaded=0&left=1000&compact=1&numwant=50"
    )


def send(port: int, paths: list[tuple[str, str]], clients: int) -> int:
    """GET each (source address, path), ``clients`` at a time; the number of failures."""
    failures = [0]
    work = iter(paths)
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                item = next(work, None)
            if item is None:
                return
            source, path = item
            try:
                conn = http.client.HTTPConnection(
                    "127.0.0.1", port, timeout=30, source_address=(source, 0)
                )
                conn.request("GET", path)
                answer = conn.getresponse()
                body = answer.read()
                conn.close()
                if answer.status != 200 or b"failure" in body:
                    raise OSError(body[:80])
            except OSError:
                with lock:
                    failures[0] += 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures[0]


def measure(n: int, rack_size: int, requests: int, clients: int) -> dict[str, float]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(n), str(rack_size), str(Path(__file__).parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        fields = child.stdout.readline().split()
        port, opened_s, most = int(fields[0]), float(fields[1]), int(fields[2])

        def cpu() -> float:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("\n")
            child.stdin.flush()
            return float(child.stdout.readline())

        rng = random.Random(n)
        # every member announces once: the swarm as it is once the nodes are up
        opened = cpu()
        failed = send(port, [(member(i), announce_path(i)) for i in range(n)], clients)
        first = cpu() - opened
        picks = [rng.randrange(n) for _ in range(requests)]
        before = cpu()
        failed += send(port, [(member(i), announce_path(i)) for i in picks], clients)
        announce = (cpu() - before) / requests
        pending = f"/pending/{INFO_HASH.hex()}"
        before = cpu()
        failed += send(port, [(member(i), pending) for i in picks], clients)
        latecomers = (cpu() - before) / requests
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(30)
    usual = n / ANNOUNCE_INTERVAL * announce + n / Latecomers.ASK_EVERY * latecomers
    interval = max(ANNOUNCE_INTERVAL, math.ceil(n / ANNOUNCES_PER_SECOND))
    every = max(Latecomers.ASK_EVERY, n / QUESTIONS_PER_SECOND)
    asked = n / interval * announce + n / every * latecomers
    return {
        "nodes": n,
        "open_s": round(opened_s, 2),
        "lane_partners": most,
        "first_announces_s": round(first, 2),
        "announce_ms": round(announce * 1000, 3),
        "pending_ms": round(latecomers * 1000, 3),
        "cores_usual": round(usual, 3),
        "interval": interval,
        "every": every,
        "cores": round(asked, 3),
        "failed": failed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="100,1000,10000", help="comma-separated N values")
    parser.add_argument("--rack-size", type=int, default=40, help="members per rack")
    parser.add_argument(
        "--requests", type=int, default=3000, help="announces, and /pending questions, per N"
    )
    parser.add_argument("--clients", type=int, default=16, help="requests in flight at once")
    args = parser.parse_args()
    try:
        counts = node_counts(args.nodes)
    except ValueError as exc:
        print(f"error: --nodes {exc}", file=sys.stderr)
        return 2
    print(
        "| N | opening the swarm (CPU) | lane partners of a node, at most "
        "| the first announce of every node (tracker CPU) | an announce | a /pending "
        "| a core's share at 10 s and 5 s | the tracker asks for | a core's share then "
        "| failed requests |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in counts:
        r = measure(n, args.rack_size, args.requests, args.clients)
        print(
            f"| {n:,} | {r['open_s']} s | {r['lane_partners']} "
            f"| {r['first_announces_s']} s | {r['announce_ms']} ms | "
            f"{r['pending_ms']} ms | {r['cores_usual'] * 100:.0f} % | "
            f"announces every {r['interval']} s, questions every {r['every']:g} s | "
            f"{r['cores'] * 100:.0f} % | {r['failed']} |",
            flush=True,
        )
        print(json.dumps(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
