#!/usr/bin/env python3
"""A model of corral's transports past what the testbed can play: T and egress at 10,000 nodes.

**Why a flow-level model, not a discrete-event simulation.** Every figure the issue asks
for (the last node's T, the server's egress) is set by which link is the bottleneck and
for how long: the server's link for unicast, one node's link for the chain, for
multicast and for BitTorrent's swarm (a rack's own, in racks), a rack's uplink for
traffic that crosses it. Max-min fair sharing of those links gives
each flow's rate in closed form, so the model is a few lines per transport, runs 10,000
nodes in microseconds, and every term can be read and argued with. A packet-level
simulation would need constants (switch buffers, TCP's state machine, libtorrent's
choker) that 50 runs on one machine cannot calibrate. What a flow model cannot see is
listed in ``docs/benchmarks.md``.

**What is calibrated** (``CALIBRATION``: a coordinate search over the recorded runs for
the least median and worst relative error on T, then rounded; ``--check`` shows the
result, ``docs/benchmarks.md`` the table):

- ``eta_tcp``: the share of a link's rate a TCP stream carries as image data (headers,
  ACK clocking); ``t0``: each node's fixed start (plan, partitioning, first request);
- ``fair``: http/rsync at a congested bottleneck do not share it evenly; the last nodes
  end alone on their own links. T = load/capacity x (1 + fair x the congested share);
- ``eta_rsync``: rsync's rate on a node's link against a plain HTTP stream (it walks the
  tree; its bytes on the server's link are about those of http);
- ``eta_mc``: multicast's data rate against B (udp-sender capped at 95 % of B, 3 % FEC,
  UDP headers), with corral's default FEC (8x4/128); a run with another ``--fec`` (async
  mode's 8x8/128, or the site's) pays that one's redundancy instead; ``repair``: the
  share of a stripe re-sent when some receiver lost more than its FEC repairs;
- ``hop_bytes``: a chain hop's delay at the stream's end, as bytes at B (hop_bytes / B
  a hop; 40-76 ms were measured at 1 and 2 Mbit/s, where the relays wait for the host's
  cores while the nodes before them unpack; mid-stream a hop takes 15 ms there);
- ``bt_start``: BitTorrent's start-up with peers (the tracker's answer, a look at the
  peers, the first choke rounds), seconds; ``bt_depth``: the swarm's stretch of a node's
  S/B per doubling of N (its link is not busy all the time); ``bt_seed``: the seed's
  share of the server link (fitted when the seed bound the old swarm); ``bt_rescue``:
  the share of S the seed sends again in small racks, for lane pieces no partner
  brought (egress only; on one switch and in large racks the seed sends one copy);
  ``bt_ctl``: what the seed and the tracker send each node per second besides pieces
  (announces, the protocol's messages, acknowledgements; egress only);
  ``bt_overlap``: in small racks, where a node brings its lane in beside its rack's
  trade, the share of the shorter of the two that still adds to the longer (the last
  lane pieces spread when the lane is in, the links the two share);
- ``ctl_bytes``: control traffic per node on the server's link (plan, reports, tokens);
- ``host_ack``, ``host_relay``, ``host_disk``: the testbed only. Its nodes share two
  cores, so an acknowledgement (multicast, per slice) or a relay's turn (chain) waits
  for the host, N x constant x rho / (1 - rho), rho the run's recorded host CPU; and N
  nodes that end together unpack and sync their disks on one host (N x host_disk). Zero
  on real hardware, where every node has its own CPU and disk: the predictions leave
  them out.

**Assumed, not calibrated** (the testbed cannot measure them): a round trip of 0.2 ms
between nodes and server, 1 us of the udp-sender's CPU per receiver's acknowledgement,
TCP's rate under loss by Mathis et al.'s 1.22 MSS / (RTT sqrt(p)), BitTorrent on 8
flows per node (the agent's upload slots), the server at the spine outside every rack,
and multicast's HTTP catch-ups sharing half the server link.

**What the BitTorrent model leaves out** (``docs/benchmarks.md`` lists the rest): the
wait of a node whose lane partner is slow or dead (the seed's rescue of its pieces, and
the 5 s handover); a rack's swarm is modelled as a flat one of its size, fitted on one
switch; rarest-first, endgame and choking beyond one stretch; the lanes' relays (in 250
racks a stripe reaches a rack through up to 4 lane partners, a piece's time each); and
the testbed's saturated host (its runs are excluded, not modelled).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from corral.agent.receivers.bittorrent.libtorrent_swarm import UPLOAD_SLOTS
from corral.agent.receivers.bittorrent.receiver import LANE_SESSION_SHARE
from corral.agent.receivers.chain.receiver import LAG_SECONDS
from corral.deploy.transports.multicast_options import MODE_FEC, MulticastOptions, fec_parts
from corral.errors import InvalidValue
from corral.testbed.plan import parse_rate, parse_size

ROOT = Path(__file__).resolve().parent.parent
RUNS = (ROOT / "docs" / "deploy-runs.jsonl", ROOT / "docs" / "diskless-runs.jsonl")
TRANSPORTS = ("http", "rsync", "multicast", "chain", "bittorrent")

CALIBRATION: dict[str, float] = {
    "eta_tcp": 0.956,
    "t0": 1.2,
    "fair": 0.2,
    "eta_rsync": 0.89,
    "eta_mc": 0.863,
    "repair": 0.18,
    "hop_bytes": 15_000,
    "bt_start": 14.0,
    "bt_depth": 0.025,
    "bt_rescue": 0.2,
    "bt_seed": 0.75,
    "bt_overlap": 0.4,
    "ctl_bytes": 30_000,
    "bt_ctl": 250,
    "host_ack": 0.0052,
    "host_relay": 0.035,
    "host_disk": 0.2,
}

RTT = 200e-6
ACK_CPU = 1e-6
MSS = 1448
# A node uploads to this many peers at once, so it takes from as many.
BT_FLOWS = UPLOAD_SLOTS
# Egress per rack, in copies of S, above which a recorded BitTorrent run is of the old
# swarm, whose seed re-sent most pieces (20-28 x S at N = 100); the model's sends one
# copy, and in small racks 0.2 of a copy more (bt_rescue).
BT_STORM = 3.0
# ... if it was measured before the swarm meshed (afbc2e8, the testbed's neighbour tables,
# 2026-12-03 22:18 UTC): later runs that send that much (the current swarm under a start
# skew) are the model's to predict.
BT_MESHED = "2026-12-03 22:18"
# ... and a rack run from when the doors were the design (99bee39's first run) that is
# not labelled with them (c8b0633's) is of the doors ...
BT_DOORS = "2026-12-04 04:54"
# ... until the lanes replaced them (3ea2f66's first run): a rack run from then on is of
# the lanes, whether its label says so or not.
BT_LANES = "2026-12-05 07:03"
CATCHUP_SHARE = 0.5
# udpcast's data blocks, in bytes; the FEC of a run is its ``--fec``, corral's default for
# acknowledged mode (8x4/128: slices of 8 stripes of 128 blocks, 4 redundant per stripe)
# unless the run set one. ``eta_mc`` was fitted with that default's 4 of 128.
MC_BLOCK = 1456
MC_DEFAULT_FEC = MODE_FEC["acked"]


@dataclass(frozen=True)
class Cluster:
    """One deployment: sizes in bytes, rates in bit/s, times in seconds."""

    nodes: int
    size: float
    node_link: float
    server_link: float
    rack_size: int = 0  # 0: every node on one switch
    oversubscription: float = 1.0
    loss: float = 0.0
    stragglers: float = 0.0  # the fraction of nodes whose link runs at B/10
    skew: float = 0.0  # nodes start at random over this window
    host_load: float = 0.0  # the testbed's shared CPU (0 on real hardware)
    host_disks: bool = False  # the testbed's nodes write their disks on one host
    fec: str = MC_DEFAULT_FEC  # multicast's --fec (interleave x redundancy / stripe)

    @property
    def slow(self) -> int:
        return int(self.stragglers * self.nodes + 0.5)

    @property
    def uplink(self) -> float:
        if not self.rack_size or self.rack_size >= self.nodes:
            return math.inf
        return self.rack_size * self.node_link / self.oversubscription

    @property
    def one_copy(self) -> float:
        """S/B: one copy over one node's link."""
        return self.size * 8 / self.node_link


@dataclass(frozen=True)
class Prediction:
    t: float  # the last node done
    t_others: float  # the last node done but the stragglers
    egress: float  # bytes the server sends


def _tcp_rate(c: Cluster, link: float, k: dict[str, float], flows: int = 1) -> float:
    """Image bytes per second through one TCP path over ``link``, loss included."""
    rate = k["eta_tcp"] * link / 8
    if c.loss > 0:
        rate = min(rate, flows * 1.22 * MSS / (RTT * math.sqrt(c.loss)))
    return rate


def _host_wait(c: Cluster, constant: float) -> float:
    rho = min(c.host_load, 0.95)
    return constant * c.nodes * rho / (1 - rho)


def _host_finish(c: Cluster, k: dict[str, float]) -> float:
    """The testbed's nodes that end together unpack, sync and unmount on the same cores."""
    return k["host_disk"] * c.nodes if c.host_disks else 0.0


def _congested(load: float, capacity: float, demand: float, fair: float) -> float:
    """Seconds to carry ``load`` bytes over ``capacity`` asked for at ``demand``."""
    if demand <= capacity:
        return 0.0
    return load / capacity * (1 + fair * (1 - capacity / demand))


def _stragglers_done(c: Cluster, k: dict[str, float], t_others: float) -> float:
    if not c.slow:
        return t_others
    return max(t_others, k["t0"] + c.skew + c.size / _tcp_rate(c, c.node_link / 10, k))


def unicast(c: Cluster, k: dict[str, float], eta: float = 1.0) -> Prediction:
    """http and rsync: N copies from the server, fair-shared at the server and the racks."""
    node = eta * _tcp_rate(c, c.node_link, k)
    # a lost segment crosses the server's link and the uplinks twice
    server = k["eta_tcp"] * (1 - c.loss) * c.server_link / 8
    bulk = _congested(c.nodes * c.size, server, c.nodes * node, k["fair"])
    if c.uplink < math.inf:
        uplink = k["eta_tcp"] * (1 - c.loss) * c.uplink / 8
        bulk = max(bulk, _congested(c.rack_size * c.size, uplink, c.rack_size * node, k["fair"]))
    t = k["t0"] + max(c.skew + c.size / node, bulk)
    egress = c.nodes * (c.size / k["eta_tcp"] / (1 - c.loss) + k["ctl_bytes"])
    return Prediction(_stragglers_done(c, k, t), t, egress)


def _fec(text: str) -> tuple[int, int, int]:
    """(interleave, redundancy, stripe size) of a ``--fec`` value; "" (no FEC) as slices
    of 8 stripes of 128 blocks with no redundancy."""
    return fec_parts(text) if text else (8, 0, 128)


#: the default FEC's redundancy share, which ``eta_mc`` holds
_, _redundancy, _stripe = _fec(MC_DEFAULT_FEC)
MC_DEFAULT_SHARE = _redundancy / _stripe


def _mc_repair(c: Cluster, k: dict[str, float], redundancy: int, stripe: int) -> float:
    """The share of S re-sent: stripes where some receiver lost more than the FEC
    (``redundancy`` blocks of each ``stripe``) repairs."""
    if c.loss <= 0:
        return 0.0
    blocks = stripe + redundancy
    within = sum(
        math.comb(blocks, i) * c.loss**i * (1 - c.loss) ** (blocks - i)
        for i in range(redundancy + 1)
    )
    return k["repair"] * (1 - within ** (c.nodes - c.slow))


def multicast(c: Cluster, k: dict[str, float]) -> Prediction:
    """One session at the pace of the slowest receiver left in it, acknowledged per slice;
    a straggler leaves it and catches up by HTTP."""
    link = min(c.node_link, c.uplink)
    interleave, redundancy, stripe = _fec(c.fec)
    repair = _mc_repair(c, k, redundancy, stripe)
    fec = redundancy / stripe
    # eta_mc holds the default FEC's share; another FEC's replaces it
    eta = k["eta_mc"] * (1 + MC_DEFAULT_SHARE) / (1 + fec)
    stream = c.size * (1 + repair) * 8 / (eta * link)
    slices = math.ceil(c.size / (MC_BLOCK * interleave * stripe))
    acks = slices * (RTT + c.nodes * ACK_CPU + _host_wait(c, k["host_ack"]))
    t = k["t0"] + c.skew + stream + acks + _host_finish(c, k)
    catch_up = c.slow * c.size / (CATCHUP_SHARE * k["eta_tcp"] * c.server_link / 8)
    t_all = max(_stragglers_done(c, k, t), k["t0"] + c.skew + catch_up)
    egress = c.size * (1 + fec) * (1 + repair) / k["eta_tcp"]
    egress += c.slow * c.size + c.nodes * k["ctl_bytes"]
    return Prediction(t_all, t, egress)


def chain(c: Cluster, k: dict[str, float]) -> Prediction:
    """A pipeline through every node, ordered rack by rack so that it crosses each uplink
    once; a straggler is passed once its successor sees it fall behind."""
    rate = _tcp_rate(c, min(c.node_link, c.uplink), k)
    hops = (c.nodes - 1) * (k["hop_bytes"] * 8 / c.node_link + RTT / 2)
    # the agent's test: a relay LAG_SECONDS behind its upstream's pace is passed; a
    # straggler at B/10 falls 0.9 s behind every second
    detect = c.slow * LAG_SECONDS / 0.9
    t = k["t0"] + c.skew + c.size / rate + hops + detect
    t += _host_wait(c, k["host_relay"]) + _host_finish(c, k)
    egress = c.size / k["eta_tcp"] * (1 + c.loss) + c.nodes * k["ctl_bytes"]
    return Prediction(_stragglers_done(c, k, t), t, egress)


def bittorrent(c: Cluster, k: dict[str, float]) -> Prediction:
    """corral's swarm: stripes from the seed, then trading; in racks, lanes first.

    After ``bt_start`` (tracker, a look at the peers, the first choke rounds) every node
    takes its stripe, 1/N of the pieces, from the seed: the stripes together are one copy,
    sent at ``bt_seed`` of the server link. Then the nodes trade, each bound by its own
    link, stretched by ``bt_depth`` per doubling of N. In R racks of n, each node first
    brings its lane into its rack (the other racks' stripes at its place), (1 - 1/R) S into
    each rack across its uplink, S/n-ish a node; then each rack trades on its own, a swarm
    of n. In small racks, where a lane is a tenth of the image or more
    (``LANE_SESSION_SHARE``), a node does both at once, in two sessions: the slower of the
    two counts, and ``bt_overlap`` of the other. A node that comes while the others still
    trade trades at their pace: the runs at a start skew of 30 and 60 s took 1.5-1.7 x S/B
    from the last node's start, not the 1 x S/B of its own link (a model that said so was
    10-17 % short on them); one that comes after they are done takes S at its own link's
    rate. The seed sends the image once; in small racks, where lanes are apart, it sends
    again what no lane partner brought: ``bt_rescue`` x S, at most what its share of the
    link carries while the swarm runs. Besides pieces, the seed and the tracker send each
    node ``bt_ctl`` bytes a second for as long as the deployment runs. The testbed's
    installs end on its one host's disks, as the other transports' do (``host_disk``)."""
    down = _tcp_rate(c, c.node_link, k, BT_FLOWS)
    if c.nodes == 1:  # the seed alone, as HTTP would
        t = k["t0"] + c.skew + c.size / down
        return Prediction(t, t, c.size / k["eta_tcp"] + k["ctl_bytes"])
    racks = c.nodes // c.rack_size if c.uplink < math.inf else 1
    seed = k["bt_seed"] * k["eta_tcp"] * c.server_link / 8
    swarm_n = c.rack_size if racks > 1 else c.nodes
    swarm = (1 + k["bt_depth"] * math.log2(swarm_n)) * c.size / down
    apart = _lane_apart(c.nodes, racks)  # in small racks, the lane's session beside the trade
    if racks > 1:
        lane = (1 - 1 / racks) * c.size
        bring = max(lane / (k["eta_tcp"] * c.uplink / 8), lane / c.rack_size / down)
        if apart:
            swarm = max(swarm, bring) + k["bt_overlap"] * min(swarm, bring)
        else:
            swarm += bring
    rescued = min(k["bt_rescue"] * c.size, seed * swarm) if apart else 0.0
    together = c.size / seed + swarm
    late = c.skew + (swarm if c.skew < together else c.size / down)
    t = k["t0"] + k["bt_start"] + max(late, together) + _host_finish(c, k)
    egress = (c.size + rescued) / k["eta_tcp"] + c.nodes * (k["ctl_bytes"] + k["bt_ctl"] * t)
    return Prediction(_stragglers_done(c, k, t), t, egress)


MODELS: dict[str, Callable[[Cluster, dict[str, float]], Prediction]] = {
    "http": unicast,
    "rsync": lambda c, k: unicast(c, k, k["eta_rsync"]),
    "multicast": multicast,
    "chain": chain,
    "bittorrent": bittorrent,
}


def predict(transport: str, cluster: Cluster, k: dict[str, float] | None = None) -> Prediction:
    if transport not in MODELS:
        raise InvalidValue(
            f"no model of transport '{transport}'", f"give one of {', '.join(TRANSPORTS)}"
        )
    return MODELS[transport](cluster, k or CALIBRATION)


@dataclass(frozen=True)
class Run:
    """One recorded testbed run, as the model sees it."""

    label: str
    transport: str
    kind: str
    cluster: Cluster
    t: float  # measured, from the first node's first report (the stragglers left out)
    egress: float
    excluded: str  # why the summary leaves it out, or ""


def _exclusion(record: dict[str, object], transport: str, egress_s: float) -> str:
    if not record.get("valid", True):
        return f"host CPU {float(record['cpu']):.0%}: measured the host (recorded invalid)"  # type: ignore[arg-type]
    failed = [f for f in record.get("failed") or [] if "cancelled" not in str(f)]  # type: ignore[attr-defined]
    if len(failed) > 1:
        return f"{len(failed)} of {record['n']} nodes failed for silence (recorded)"
    if transport == "chain" and egress_s > 2:
        return f"egress {egress_s:.1f} x S recorded: nodes left the chain for HTTP"
    if transport == "bittorrent":
        return _bt_design(
            str(record["transport"]),
            int(record.get("racks") or 0),  # type: ignore[call-overload]
            egress_s,
            str(record.get("measured") or ""),
            int(record.get("n") or 0),  # type: ignore[call-overload]
        )
    return ""


#: Lane designs in racks that were tried and left: the words of their runs' labels, and
#: why the model leaves those runs out.
BT_LANES_LEFT = (
    (
        "lanes to every rack",
        "lanes given up after 30 s behind slow uplinks, rescued from the seed (75bff76)",
    ),
    (
        "the rack's pieces while importing",
        "a node took its rack's pieces while importing (77286c2; reverted in b80ae51)",
    ),
    (
        "the rack's pieces during the lane",
        "a node took its rack's pieces during its lane (745edd0; reverted in 50ce200)",
    ),
    ("lanes even in pieces", "lanes cut by pieces, not stripes (da9d253; reverted in 342d5fe)"),
    (
        "lane patience from its first piece",
        "a lane's patience from its first piece at a peer (342d5fe; reverted in e7f6166)",
    ),
    (
        "rescues when the rack is quiet",
        "rescues only when the rack is quiet (04e035f; reverted in 9e08444)",
    ),
    (
        "partners unchoked, rack pieces during the lane",
        "lane partners unchoked beside the slots, the rack's pieces during the lane "
        "(0917b94; reverted in 60d286e)",
    ),
    (
        "(import first here), 4 racks",
        "the rack's rescue shared for six idle times (e6dfe27 to f6c06f2; three again since "
        "0bafd5b)",
    ),
    (
        "lanes in a session of their own, 20 racks",
        "the lane's own session, lanes of unequal size (48526b3; 8244cbb evened them)",
    ),
    (
        "rescues at the lane's pace",
        "a lane's rescue at its own session's pace (70fab7a; reverted in bb454a3)",
    ),
    (
        "spare pieces spread over the turns",
        "lanes of one size, the spare pieces spread over the racks' turns (ee825ba; "
        "reverted in 2ae4358)",
    ),
)


#: From this run on, a node that is done judges a slow peer on its pieces over the swarm's
#: age (3eb1f2e): before, the nodes lingered for a node at B/10, up to a minute, and the
#: model, whose nodes leave a straggler to the seed, does not describe those runs.
BT_LINGER_BY_PIECES = "2026-12-06 23:05"


def _lane_apart(nodes: int, racks: int) -> bool:
    """Whether a node brings its lane in a session of its own (as the agent decides, from
    its lane's share of the pieces: ``LANE_SESSION_SHARE``)."""
    return racks > 1 and (1 - 1 / racks) / (nodes / racks) >= LANE_SESSION_SHARE


def _bt_design(label: str, racks: int, egress_s: float, measured: str = "", nodes: int = 0) -> str:
    """Why a BitTorrent run is of a design the model no longer describes, or "".

    ``measured``: the run's date and time as recorded (none in the oldest records)."""
    if racks > 1:
        for words, why in BT_LANES_LEFT:
            if words in label:
                return why
        apart = "session of their own" in label or "lane's session" in label
        if "lane" in label and apart != _lane_apart(nodes, racks):
            if apart:
                return (
                    "the lane's own session in racks of 25 (4b8dae3, e6dfe27): since "
                    "b6cc1d0 they bring the lane in first"
                )
            return "in small racks the lane first, then the trade (before 48526b3)"
    if racks > 1 and "lane" not in label and measured < BT_LANES:
        if "doors," in label:
            return "a variant of the rack doors tried on the way (99bee39 replaced it)"
        if "one door per rack" in label or measured >= BT_DOORS:
            return "one door per rack (99bee39 to c8b0633; lanes replaced it at 3ea2f66)"
        return "racks before the doors: peers crossed the uplinks at will (replaced at 756f5bb)"
    if "B/10" in label and measured < BT_LINGER_BY_PIECES:
        return (
            "the others lingered for the node at B/10 (libtorrent's once-a-minute rate "
            "estimate, then their own; 3eb1f2e judges it on its pieces)"
        )
    if measured < BT_MESHED and egress_s > BT_STORM * max(racks, 1):
        return (
            f"egress {egress_s:.1f} x S recorded: the seed re-sent most pieces, the swarm "
            "before its ARP and upload-slot fixes (afbc2e8, 8855c8c)"
        )
    return ""


def load_runs(paths: Iterable[Path] = RUNS) -> list[Run]:
    """Every run of ``docs/*-runs.jsonl``.

    The records carry no loss or slow-node field: the scenario is read from the label
    (``multicast (1% loss)``, ``chain (tb050 at B/10)``). The 2026-11-25 unicast runs
    recorded no skew; it is taken as 0 (unicast there is bound by the server link)."""
    runs = []
    for path in paths:
        kind = path.stem.split("-")[0]
        for line in path.read_text().splitlines():
            r = json.loads(line)
            label = r["transport"]
            transport = re.split(r"[ ,(]", label)[0]
            link, server = parse_rate(r["link"]), parse_rate(r["server_link"])
            size = r["s_over_b"] * link / 8
            loss = re.search(r"(\d+(?:\.\d+)?)% loss", label)
            n = r["n"]
            racks = int(r.get("racks") or 0)
            rack_size = n // racks if racks > 1 else 0
            uplink = parse_rate(r["rack_uplink"]) if rack_size and r.get("rack_uplink") else 0
            cluster = Cluster(
                nodes=n,
                size=size,
                node_link=link,
                server_link=server,
                rack_size=rack_size,
                oversubscription=rack_size * link / uplink if uplink else 1.0,
                loss=float(loss.group(1)) / 100 if loss else 0.0,
                stragglers=1 / n if "B/10" in label else 0.0,
                skew=r.get("skew") or 0.0,
                host_load=r.get("cpu") or 0.0,
                host_disks=kind == "deploy",
                # the FEC the run's udp-sender used, by corral's own rule
                fec=MulticastOptions(
                    mode=r.get("multicast_mode") or "acked", fec=r.get("multicast_fec")
                ).fec_used,
            )
            egress = float(r["egress"])
            t = r.get("t_others") or r["t"]
            why = _exclusion(r, transport, egress / size)
            if "repeat" in r:
                label = f"{label} #{r['repeat']}"
            runs.append(Run(f"{kind}: {label}", transport, kind, cluster, t, egress, why))
    return runs


def check(runs: Sequence[Run], k: dict[str, float] | None = None) -> list[dict[str, object]]:
    """Measured against predicted T (the stragglers left out, as measured) per run."""
    rows = []
    for run in runs:
        p = predict(run.transport, run.cluster, k)
        rows.append(
            {
                "run": run.label,
                "transport": run.transport,
                "n": run.cluster.nodes,
                "link": run.cluster.node_link,
                "t": run.t,
                "t_model": p.t_others,
                "error": p.t_others / run.t - 1,
                "egress_s": run.egress / run.cluster.size,
                "egress_model_s": p.egress / run.cluster.size,
                "excluded": run.excluded,
            }
        )
    return rows


def summarise(rows: Sequence[dict[str, object]]) -> dict[str, tuple[float, float, int]]:
    """Per transport: (median |error|, worst |error|, runs) over the runs not excluded."""
    out = {}
    for transport in TRANSPORTS:
        errors = [
            abs(float(r["error"]))  # type: ignore[arg-type]
            for r in rows
            if r["transport"] == transport and not r["excluded"]
        ]
        if errors:
            out[transport] = (statistics.median(errors), max(errors), len(errors))
    return out


def _rate_text(bps: float) -> str:
    return f"{bps / 1e9:g}g" if bps >= 1e9 else f"{bps / 1e6:g}mbit"


def print_check(rows: Sequence[dict[str, object]]) -> None:
    print("| run | N | B | T measured (s) | T model (s) | error | egress ÷ S: measured | model |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" (excluded: {r['excluded']})" if r["excluded"] else ""
        print(
            f"| {r['run']}{note} | {r['n']} | {_rate_text(float(r['link']))} "  # type: ignore[arg-type]
            f"| {r['t']:.1f} | {r['t_model']:.1f} | {float(r['error']):+.1%} "  # type: ignore[arg-type]
            f"| {r['egress_s']:.2f} | {r['egress_model_s']:.2f} |"
        )
    print("\n| transport | N | runs | median abs. error | worst |")
    print("|---|---|---|---|---|")
    for n in sorted({int(r["n"]) for r in rows}):  # type: ignore[call-overload]
        for transport, (median, worst, count) in summarise(
            [r for r in rows if r["n"] == n]
        ).items():
            print(f"| {transport} | {n} | {count} | {median:.1%} | {worst:.1%} |")
    for transport, (median, worst, count) in summarise(rows).items():
        print(f"| **{transport}** | all | {count} | {median:.1%} | {worst:.1%} |")


GIB = 1 << 30
SCALE = Cluster(
    nodes=1000,
    size=4 * GIB,
    node_link=10e9,
    server_link=25e9,
    rack_size=40,
    oversubscription=4,
)
#: scenario: (loss, the share of stragglers)
SCENARIOS = {"clean": (0.0, 0.0), "1 % loss, 1 % stragglers": (0.01, 0.01)}
PLOT_NODES = (10, 20, 40, 80, 200, 400, 1000, 2000, 4000, 10_000)


def prediction_table(base: Cluster = SCALE) -> list[str]:
    lines = [
        "| transport | scenario | N | T (s) | T ÷ S/B | others' T ÷ S/B | egress ÷ S |",
        "|---|---|---|---|---|---|---|",
    ]
    for transport in TRANSPORTS:
        for name, (loss, stragglers) in SCENARIOS.items():
            for n in (1000, 10_000):
                c = replace(base, nodes=n, loss=loss, stragglers=stragglers)
                p = predict(transport, c)
                lines.append(
                    f"| {transport} | {name} | {n:,} | {p.t:,.1f} | {p.t / c.one_copy:,.2f} "
                    f"| {p.t_others / c.one_copy:,.2f} | {p.egress / c.size:,.2f} |"
                )
    return lines


def plot(path: Path, base: Cluster = SCALE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (name, (loss, stragglers)) in zip(axes, SCENARIOS.items(), strict=True):
        for transport in TRANSPORTS:
            ts = [
                predict(transport, replace(base, nodes=n, loss=loss, stragglers=stragglers)).t
                for n in PLOT_NODES
            ]
            ax.plot(PLOT_NODES, ts, marker="o", label=transport)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes N")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("T, the last node done (s)")
    axes[0].legend()
    fig.suptitle("bench/model.py: 4 GiB image, 10 GbE nodes, 25 GbE server, racks of 40 at 4:1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _rate(text: str) -> float:
    """``10g`` and ``25g`` as well as tc's ``20mbit``, ``10gbit``."""
    spelled = re.sub(r"(?i)^([\d.]+)([kmg])$", r"\1\2bit", text.strip())
    return parse_rate(spelled)


def _cluster(args: argparse.Namespace) -> Cluster:
    try:
        link, server = _rate(args.node_link), _rate(args.server_link)
    except InvalidValue as exc:
        raise InvalidValue(
            f"{exc.message} for a link", "give e.g. 2mbit, 20mbit, 10g or 25g"
        ) from exc
    try:
        size = parse_size(args.size)
    except InvalidValue as exc:
        raise InvalidValue(f"bad image size '{args.size}'", "give e.g. 512MiB or 4GiB") from exc
    if args.nodes < 1:
        raise InvalidValue(f"{args.nodes} nodes", "give --nodes 1 or more")
    racks = args.rack_size
    if racks < 0 or (racks and args.nodes > racks and args.nodes % racks):
        raise InvalidValue(
            f"{args.nodes} nodes do not fill racks of {args.rack_size}",
            "give a --rack-size that divides --nodes (or 0 for one switch)",
        )
    if not 1 <= args.oversubscription <= max(args.rack_size, 1):
        raise InvalidValue(
            f"oversubscription {args.oversubscription:g}:1 with racks of {args.rack_size}",
            "give 1 (none) up to the rack size (an uplink as fast as one node's link)",
        )
    for name in ("loss", "stragglers"):
        if not 0 <= getattr(args, name) < 1:
            raise InvalidValue(f"--{name} {getattr(args, name)}", "give a fraction, e.g. 0.01")
    if args.skew < 0:
        raise InvalidValue(f"--skew {args.skew}", "give 0 or more seconds")
    return Cluster(
        args.nodes, size, link, server, args.rack_size, args.oversubscription,
        args.loss, args.stragglers, args.skew,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transport", default="chain")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--node-link", default="10g")
    parser.add_argument("--server-link", default="25g")
    parser.add_argument("--rack-size", type=int, default=0, help="0: one switch")
    parser.add_argument("--oversubscription", type=float, default=1.0)
    parser.add_argument("--loss", type=float, default=0.0, help="a fraction: 0.01 is 1 %%")
    parser.add_argument("--stragglers", type=float, default=0.0, help="the fraction at B/10")
    parser.add_argument("--skew", type=float, default=0.0, help="seconds")
    parser.add_argument("--size", default="4GiB")
    parser.add_argument("--check", action="store_true", help="against the recorded runs")
    parser.add_argument("--predict", action="store_true", help="1,000 and 10,000 nodes")
    parser.add_argument("--plot", type=Path, help="with --predict: T against N, a PNG")
    args = parser.parse_args(argv)
    try:
        if args.check:
            print_check(check(load_runs()))
        elif args.predict or args.plot:
            print("\n".join(prediction_table()))
            if args.plot:
                plot(args.plot)
        else:
            c = _cluster(args)
            p = predict(args.transport, c)
            print(f"T = {p.t:.1f} s ({p.t / c.one_copy:.2f} x S/B), the stragglers left out "
                  f"{p.t_others:.1f} s; egress = {p.egress / c.size:.2f} x S")  # fmt: skip
    except InvalidValue as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
