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
#:
#: Measured 2026-12-02 with ``bench/deploy.py --size-mib 32 --link 2mbit --server-link
#: 20mbit`` (S = 29.9 MiB, S/B = 125 s, the server link 10 x a node's, as 10 GbE to 1 GbE
#: nodes), T / (S/B) per transport and node count (docs/benchmarks.md):
#:
#:     N     http   multicast  chain  bittorrent
#:     1     1.05   1.13       1.05   1.06
#:     10    1.07   1.15       1.11   1.36
#:     50    >= 6.2 1.28       1.15   1.94
#:     100   >= 12  1.53       1.32   (see the docs)
#:
#: (http beyond 10 nodes: its unicast bound N·S/B_server times the 1.15-1.25 it kept to
#: in the unicast runs of 2026-11-25.)
#:
#: Re-derived 2026-12-03 from issue 17's runs at N = 100, median (worst) of 3: the chain
#: 1.28-1.32 (worst 1.35) at start skews of 0, 30 and 60 s, and 1.26 (1.27) across 4 racks
#: behind 4:1 uplinks, crossing each uplink 1.03-1.10 x S; multicast 1.42-1.50 (worst
#: 1.52), 1.09 x S per uplink. Unicast across the same racks crosses a rack's uplink once
#: per node in it.
#:
#: And again 2026-12-04, with BitTorrent's swarm meshing (3 runs each, median (worst)):
#: 1.76 (1.78) at skew 0, 1.60 (1.65) at 30 s, 1.57 (1.59) at 60 s, egress 1.44 x S at
#: skew 0 but 2.5-4.7 x S at 30-60 s (since 75a6bc2 1.77 (1.78) and 1.85 (1.89) x S,
#: T 1.66 (1.66) and 1.63 (1.67)); 1.77 (1.81) with 1 % loss (chain: 1.33, one run);
#: the others beside a node at B/10 2.07 (2.08) (chain: 1.50), beside a killed node
#: 1.76 (1.79) (chain: 1.31); across 4 racks 2.02 (2.30), 1.43 x S per uplink.
#: BitTorrent lost to the chain in every case measured: the order stands, the chain from
#: 16 nodes, and BitTorrent is never auto's choice.
#:
#: Up to N = B_server/B unicast is as fast as one copy
#: and needs nothing of the network; past it, unicast grows with N and the chain does not.
#: The chain won every run from 50 nodes, kept egress near one copy, and needs no
#: multicast-capable switches; the crossover is put at 16 nodes, 1.6 x the measured ratio
#: of links, where unicast's bound is already 1.6 x one copy. Images under 64 MiB stay on
#: http: at 10 GbE 100 nodes take them in under 6 s, the chain's measured extra start-up
#: (its T - http's T at N = 10, 5.8 s).
CROSSOVERS: tuple[Crossover, ...] = (Crossover("chain", 16, 64 << 20),)

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
