"""Benchmark: what the chain's agent code costs in CPU per MiB, on loopback.

On the testbed's links (1 to 20 Mbit/s) the agents are never the bound; on 10 GbE they
may be (docs/real-hardware.md, "Fast links"). This measures the agent's own share without
a testbed: a head (a relay whose window holds every chunk, in this process) and N chain
receivers (:class:`ChainReceiver`, the agent's code, each in a process of its own as on
its own node, on its own 127.0.0.x address) pull an image of random chunks through each
other, each checking every chunk and the whole stream, and throwing the checked bytes
away (no ``zstd | tar``: their cost is the image's, not the chain's). Printed per run:
the wall time, the nodes' user and system CPU, the CPU per MiB per node, and the head's;
then the median and the worst of the runs.

    .venv/bin/python bench/relay_cpu.py [--nodes 1,2] [--size-mib 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# bench/ is not a package: the test fakes come from the repository's root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.agent.receivers.base import Context, Job
from corral.agent.receivers.chain.receiver import ChainReceiver
from corral.agent.receivers.chain.relay import Relay
from corral.agent.receivers.chain.window import Window
from corral.agent.receivers.stream import Unpacker
from corral.agent.report import Client
from corral.agent.wire.chain import session_tag
from tests.fakes import ChunkServer, free_port, stream_plan

CHUNK = 4 << 20
#: Seconds the nodes have to receive the image, all of them (a node that hangs is killed)
NODE_TIMEOUT = 600.0
TAG = session_tag(1, "bench:1", "00" * 32)


class Discard:
    """An unpacker that keeps nothing: its own factory, as a receiver's ``make_unpacker``."""

    def __call__(self, target_dir: Path) -> Unpacker:
        return cast(Unpacker, self)

    def write(self, data: bytes) -> None:
        pass

    def finish(self, timeout: float = 600) -> None:
        pass

    def abort(self) -> None:
        pass


class Quick(ChainReceiver):
    """Closes its relay a second after the last node has everything, not 20 s."""

    drain_idle = 1.0
    linger = 1.0


@dataclass
class Run:
    nodes: int
    mib: int
    wall: float
    user: float
    system: float
    head: float

    @property
    def per_mib(self) -> float:
        """Milliseconds of the nodes' CPU per MiB per node."""
        return 1000 * (self.user + self.system) / self.mib / self.nodes


def receive(name: str, receiver: ChainReceiver, plan: Any, go: Any) -> None:
    """One node, in a process of its own: wait for the head, receive, exit 0 (or 1)."""
    go.wait()
    try:
        receiver.receive(Job(plan, Path("/nonexistent"), lambda d, t: None, threading.Event()))
    except Exception as exc:
        print(f"error: {name}: {exc!r}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


def node(
    position: int, members: list[list[str]], ports: tuple[int, int], chunks: list[bytes]
) -> tuple[str, ChainReceiver, Any]:
    """A node's receiver and plan, made before its process (the plan's checksums are not
    the node's work)."""
    params = {
        "session": TAG,
        "position": position,
        "members": members,
        "relay_port": ports[1],
        "head": ["127.0.0.1", ports[0]],
        "base": "http://127.0.0.1:1/images/bench/1",
    }
    receiver = Quick(Context(cast(Client, ChunkServer(chunks)), tries=2))
    receiver.make_unpacker = Discard()  # type: ignore[method-assign]
    name = members[position][0]
    return name, receiver, stream_plan(chunks, "chain", params, node=name)


def run_once(nodes: int, mib: int) -> Run:
    block = os.urandom(CHUNK)
    chunks = [i.to_bytes(4, "big") + block[4:] for i in range(max(1, mib * (1 << 20) // CHUNK))]
    ports = (free_port(), free_port())
    members = [[f"tb{i + 1:03d}", f"127.0.0.{i + 2}"] for i in range(nodes)]
    # the nodes are forked before this process has a thread of its own, and wait
    fork = multiprocessing.get_context("fork")
    go = fork.Event()
    made = [node(i, members, ports, chunks) for i in range(nodes)]
    procs = [fork.Process(target=receive, args=(*m, go)) for m in made]
    for proc in procs:
        proc.start()
    window = Window([len(c) for c in chunks], keep=len(chunks))
    for i, data in enumerate(chunks):
        window.complete(i, data)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    head = Relay(("127.0.0.1", ports[0]), TAG, window)
    try:
        head.start()
        started = time.monotonic()
        go.set()
        for proc in procs:
            proc.join(max(1.0, started + NODE_TIMEOUT - time.monotonic()))
        wall = time.monotonic() - started
    finally:
        for proc in procs:  # none is left behind, whatever happened
            if proc.is_alive():
                proc.kill()
                proc.join()
        head.close()
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_done = resource.getrusage(resource.RUSAGE_SELF)
    if any(proc.exitcode for proc in procs):
        raise SystemExit(
            f"error: a node did not receive the image within {NODE_TIMEOUT:.0f} s "
            "(its error, if it had one, is above)"
        )
    return Run(
        nodes,
        round(sum(map(len, chunks)) / (1 << 20)),
        wall,
        done.ru_utime - children.ru_utime,
        done.ru_stime - children.ru_stime,
        own_done.ru_utime + own_done.ru_stime - own.ru_utime - own.ru_stime,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2", help="comma-separated numbers of nodes")
    parser.add_argument("--size-mib", type=int, default=512, help="the image, in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each")
    args = parser.parse_args()
    try:
        counts = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        print(f"error: --nodes {args.nodes!r}: give numbers, e.g. 1,2", file=sys.stderr)
        return 2
    if any(not 1 <= n <= 200 for n in counts) or args.size_mib < 4 or args.repeat < 1:
        print(
            "error: --nodes from 1 to 200, --size-mib at least 4 (one chunk), --repeat 1 or more",
            file=sys.stderr,
        )
        return 2
    print("| N | MiB | wall (s) | nodes' user (s) | nodes' system (s) | ms/MiB a node | head (s) |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for n in counts:
        runs = []
        for _ in range(args.repeat):
            r = run_once(n, args.size_mib)
            runs.append(r)
            print(
                f"| {n} | {r.mib} | {r.wall:.2f} | {r.user:.2f} | {r.system:.2f} "
                f"| {r.per_mib:.2f} | {r.head:.2f} |",
                flush=True,
            )
        figures = [r.per_mib for r in runs]
        summary.append((n, statistics.median(figures), max(figures)))
    for n, median, worst in summary:
        print(f"N = {n}: {median:.2f} ({worst:.2f}) ms of CPU per MiB a node, median (worst)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
