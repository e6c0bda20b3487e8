"""Benchmark: deploying an image to N virtual nodes, per transport.

On the virtual cluster (``corral testbed``: a namespace per node, tbf-shaped links, the
real agent writing a loop-device disk, corral serve in its own namespace), for each
transport and each N, deploys an image whose stream is about ``--size-mib`` MiB and
measures:

- T: the last node's completion, from the deployment's start (``T_boot`` includes the
  power-cycle and the agent's start; ``T`` counts from the first node's first report);
- T_recv: the same, to the last node having the whole image. What comes after (writing
  the identity, syncing, unmounting) is each node's own disk and CPU on real hardware,
  but here 100 nodes do it at once on the host's few cores;
- T / (S/B): against one node alone on its link B;
- the unicast bound ``max(S/B, N x S / B_server)`` and T against it;
- server egress / S, from the server interface's tx_bytes, and the share of the server's
  TCP segments that were retransmissions (``tcp_segments``: sent, resent, from its
  namespace's /proc/net/snmp): egress that the transports' own counts (the seed's upload,
  the chunks served) do not show; those counts are recorded too (``payload``: image bytes
  by transport, from corral serve's ``corral_image_bytes_sent`` metric), and where the
  links' queues dropped packets (``queue_drops``: at the hub's ports toward the nodes, at
  the server's own eth0), which is where what TCP sent again was lost, but for ``--loss``;
- the spread of completion times (last - first), and the skew of the nodes' first
  reports (last - first): the testbed boots every node on the host's few cores, where a
  real cluster boots them in parallel, so at 100 nodes the skew is part of T;
- with ``--skew SECONDS``, the bench powers each node on itself, at a moment drawn
  uniformly over that window (seeded: ``--seed``, printed and recorded, repeats the same
  moments), as real machines come up tens of seconds apart; T is then counted from the
  *last* node's first report, its agent's "booted" (``t_after_up``: no transport can
  serve a node before it is up), and the skew of those reports (``up_skew``) is given
  beside it. ``t_after_last`` counts from the last node's first progress report in the
  deployment instead, which a node sends only once it has its plan (a transport that
  gathers its nodes first delays that);
- host CPU use over the run; a run above ``--cpu-limit`` measured the host, not the
  transport, and is marked invalid;
- the chunks each node took by HTTP, and of those the ones its multicast session brought
  damaged (``http_chunks``, ``repaired_chunks``: node -> count, nodes with none left
  out), from the agents' "received" lines (a node that fell back to the HTTP receiver
  took every chunk by HTTP).

``--multicast-mode`` (``acked`` or ``async``) is written into the bench home's
corral.toml as ``multicast_mode``; a run's ``transport`` then reads e.g.
``multicast[async]``. ``--multicast-fec`` is written there as ``multicast_fec`` (say it
in ``--label`` too: the record keeps it as ``multicast_fec``).

Every node's disk is discarded before each run, so each run is a full install.
``--repeat K`` makes K such runs, each a fresh deployment, and prints the median and the
worst of them. Each run's record names the commit, the machine, the skew and the seed,
and the host's load average before and after it (other work on the host shows there).
Results: one JSON line per run on stdout, a Markdown table and a PNG plot
(``--markdown``, ``--png``). Transports plug in by name (``corral.deploy.transports``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from corral.agent.phases import BOOTED, DEPLOY_STEPS, DONE, FINAL, RECEIVING
from corral.deploy.store import Deployments, new_deployment
from corral.images.catalog import image_store
from corral.images.exports import build_exports
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.inventory import models as m
from corral.inventory.schema import ProfileSpec
from corral.run import unwind_on_sigterm
from corral.testbed import cluster
from corral.testbed.cluster import parse_rate

HOME = Path.home() / ".cache" / "corral-bench" / "deploy-home"
IMAGE = "bench"
#: The receivers' closing lines: the image, the chunks taken over HTTP, and (multicast's)
#: how many of those its session brought damaged. A broadcast receiver that could not
#: start hands the whole image to the HTTP receiver, whose every chunk counts.
RECEIVED = re.compile(
    r"received (?P<ref>\S+)(?:"
    r": \d+ bytes in \d+ chunks, \d+ by multicast, (?P<multicast>\d+) by HTTP"
    r"(?: \((?P<repaired>\d+) repaired)?"
    r"| by bittorrent: \d+ chunks from the swarm, (?P<swarm>\d+) over HTTP"
    r"|: \d+ bytes in (?P<http>\d+) chunks \()"
)


def node_counts(text: str) -> list[int]:
    """``--nodes`` of the benches ("1,10,100"), in increasing order; ValueError, saying
    what to give, for anything but counts of 1 or more."""
    try:
        counts = sorted(int(x) for x in text.split(","))
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise ValueError(f"{text!r}: give node counts of 1 or more, e.g. 10,100")
    return counts


def use_home(
    link: str, server_link: str | None = None, multicast_mode: str = "", multicast_fec: str = ""
) -> None:
    """Make the bench's corral home the one in use, multicast sending just under ``link``
    and, given the ``server_link``, its HTTP catch-ups sharing half of that, as a site
    that knows its server's link sets ``multicast_catchup_bitrate`` (the default, the
    multicast rate itself, is for a server link nobody gave)."""
    os.environ["CORRAL_HOME"] = str(HOME)
    HOME.mkdir(parents=True, exist_ok=True)
    # multicast sends at a fixed rate: just under the node link B
    rate = int(parse_rate(link) * 0.95)
    toml = f'multicast_max_bitrate = "{rate}"\n'
    if server_link:
        toml += f'multicast_catchup_bitrate = "{parse_rate(server_link) // 2}"\n'
    if multicast_mode:
        toml += f'multicast_mode = "{multicast_mode}"\n'
    if multicast_fec:
        toml += f'multicast_fec = "{multicast_fec}"\n'
    (HOME / "corral.toml").write_text(toml)
    db.close()


def make_image(size_mib: int, exports: tuple[str, ...] = ("stream",)) -> ImageVersion:
    """A tree whose stream is about ``size_mib``: mostly incompressible data (as binaries
    and compressed packages are), plus a few thousand small text files. ``exports``: the
    exports the version must have (a diskless boot sends the squashfs)."""
    store = image_store(HOME)
    for version in store.versions(IMAGE) if IMAGE in store.names() else []:
        stream = version.manifest.get("exports", {}).get("stream", {})
        if version.manifest.get("bench_size_mib") == size_mib and stream:
            build_exports(version, which=list(exports))  # only what is missing
            return store.get(IMAGE, version.version)
    tree = HOME / "bench-tree"
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    rng = random.Random(size_mib)
    for d in ("etc", "usr/lib/data", "usr/share/doc", "proc", "sys", "dev", "run", "tmp"):
        (tree / d).mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=corralbench\n")
    blob = max(1, size_mib - 3)
    for i in range(blob):
        (tree / "usr" / "lib" / "data" / f"blob{i:03d}.bin").write_bytes(rng.randbytes(1 << 20))
    words = ["node", "cluster", "image", "deploy", "kernel", "package", "rack", "switch"]
    for i in range(3000):
        text = " ".join(rng.choice(words) for _ in range(300))
        (tree / "usr" / "share" / "doc" / f"doc{i:04d}.txt").write_text(text + "\n")
    version = store.import_tree(IMAGE, tree)
    build_exports(version, which=sorted({"stream", *exports}))
    version = store.get(IMAGE, version.version)
    manifest_path = version.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["bench_size_mib"] = size_mib
    manifest_path.write_text(json.dumps(manifest, indent=1))
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    return store.get(IMAGE, version.version)


def cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


FIRMWARE = "firmware (python)"
#: Seconds a run waits for a slow node once all the others have ended, before it
#: cancels the deployment (a node at a tenth of B takes 10 x S/B however it gets the
#: image; the scenario measures the others).
ASIDE_WAIT = 30.0
#: Phases after the image is in, up to done (polled every 0.5 s: that is the resolution
#: of T_received).
AFTER_RECEIVING = DEPLOY_STEPS[DEPLOY_STEPS.index(RECEIVING) + 1 : DEPLOY_STEPS.index(DONE) + 1]


class CpuByProcess(threading.Thread):
    """Where the host's CPU went during a run: every second, each process's user+system
    ticks (``/proc/PID/stat``), summed at the end by what the process is (the server, an
    agent, udp-receiver, tar...), plus the kernel's softirq time (packets: veth, bridge,
    tbf), which no process is charged for."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping = threading.Event()
        self.ticks: dict[tuple[int, str], tuple[str, int]] = {}  # (pid, start) -> (kind, ticks)
        self.softirq0 = self._softirq()

    @staticmethod
    def _softirq() -> int:
        return int(Path("/proc/stat").read_text().split("\n")[0].split()[7])

    @staticmethod
    def kind(pid: str, comm: str) -> str:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return comm
        text = b" ".join(argv).decode(errors="replace")
        for marker, name in (
            ("corral.agent", "agent (python)"),
            ("corral.testbed.firmware", FIRMWARE),
            ("corral serve", "corral serve"),
            ("-m corral", "corral (other)"),
        ):
            if marker in text:
                return name
        return comm

    def sample(self) -> None:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            pid = stat.parent.name
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            key = (int(pid), fields[19])  # starttime: a reused pid is another process
            ticks = int(fields[11]) + int(fields[12])
            known = self.ticks.get(key)
            # the firmware execs the agent: same process, another command line
            kind = known[0] if known and known[0] != FIRMWARE else self.kind(pid, comm)
            self.ticks[key] = (kind, ticks)

    def run(self) -> None:
        self.base = dict(self.ticks)
        while not self.stopping.wait(1.0):
            self.sample()

    def start(self) -> None:
        self.sample()
        super().start()

    def stop(self, top: int = 6) -> dict[str, float]:
        """Core-seconds by kind of process, the largest ``top``, plus softirq."""
        self.stopping.set()
        self.join()
        self.sample()
        hz = os.sysconf("SC_CLK_TCK")
        by_kind: dict[str, float] = {}
        for key, (kind, ticks) in self.ticks.items():
            before = self.base.get(key, (kind, 0))[1]
            by_kind[kind] = by_kind.get(kind, 0.0) + (ticks - before) / hz
        ranked = sorted(by_kind.items(), key=lambda kv: -kv[1])[:top]
        result = {kind: round(sec, 1) for kind, sec in ranked}
        result["softirq"] = round((self._softirq() - self.softirq0) / hz, 1)
        return result


class PowerOn(threading.Thread):
    """Powers each node on at its moment (seconds after :meth:`start`), as a cluster whose
    machines take different times to POST: what ``--skew`` measures."""

    def __init__(self, bed: cluster.Testbed, at: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.bed = bed
        self.at = sorted(at.items(), key=lambda kv: kv[1])
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        for node, offset in self.at:
            if self.stopping.wait(max(0.0, started + offset - time.monotonic())):
                return
            try:
                self.bed.power(node, "cycle")
            except Exception as exc:  # the run goes on: the node fails for not booting
                print(f"powering {node} on: {exc}", file=sys.stderr)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def booted_at(session: Any, names: list[str], since: float) -> dict[str, float]:
    """When each node's agent first said it was up (its "booted" report, before it asks
    for its plan), since ``since``."""
    query = (
        select(m.NodeEvent.node, func.min(m.NodeEvent.time))
        .where(m.NodeEvent.phase == BOOTED, m.NodeEvent.node.in_(names), m.NodeEvent.time >= since)
        .group_by(m.NodeEvent.node)
    )
    return {node: float(at) for node, at in session.execute(query).all()}


def power_schedule(names: list[str], skew: float, seed: int) -> dict[str, float]:
    """Each node's power-on moment, uniform over ``skew`` seconds, from ``seed``."""
    rng = random.Random(seed)
    return {name: rng.uniform(0.0, skew) for name in names}


def power_by_bench(names: list[str]) -> None:
    """The deployment manager leaves these nodes for someone to power on (the bench)."""
    with db.inventory() as inv:
        inv.edit("node", names, {"power": {"driver": "manual"}})


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "cpu": model, "host": platform.node()}


def commit() -> str:
    """The commit the bench runs (with ``-dirty`` if the work tree has changes)."""
    here = Path(__file__).resolve().parent
    head = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (head or "unknown") + ("-dirty" if dirty else "")


def summary(runs: list[dict[str, Any]]) -> str:
    """Per run, then the median and the worst: T / (S/B) (from the last node's first
    report when the starts were skewed on purpose), egress / S and the share of it the
    server's TCP resent, the busiest rack uplink, start skew, spread."""

    def t_of(r: dict[str, Any]) -> float:
        t = r["t_after_up"] if r.get("skew_window") else r["t"]
        return float("nan") if t is None else t / r["s_over_b"]

    def skew_of(r: dict[str, Any]) -> float:
        skew = r["up_skew"] if r.get("skew_window") else r["skew"]
        return float("nan") if skew is None else float(skew)

    rows = [
        (
            t_of(r),
            r["egress"] / (r["s_mib"] * 2**20),
            resent_of(r),
            uplink_of(r),
            skew_of(r),
            r["spread"] if r["spread"] is not None else float("nan"),
        )
        for r in runs
    ]
    lines = [
        "| run | seed | T ÷ S/B | egress ÷ S | TCP resent | busiest uplink ÷ S | start skew (s) "
        "| spread (s) | host CPU | load before → after | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (r, (t, e, rs, u, k, sp)) in enumerate(zip(runs, rows, strict=True), 1):
        lines.append(
            f"| {i} | {r.get('seed') or DASH} | {cell(t)} | {cell(e)} | {cell(rs, '.1%')} "
            f"| {cell(u)} "
            f"| {cell(k, '.1f')} | {cell(sp, '.1f')} | {r['cpu']:.0%} "
            f"| {r['load'][0]:.1f} → {r['load'][1]:.1f} | {len(r['failed'])} |"
        )
    cols = list(zip(*rows, strict=True))
    median = [statistics.median(c) for c in cols]
    worst = [max(c) for c in cols]
    for name, vals in (("median", median), ("worst", worst)):
        lines.append(
            f"| {name} | | {cell(vals[0])} | {cell(vals[1])} | {cell(vals[2], '.1%')} "
            f"| {cell(vals[3])} | {cell(vals[4], '.1f')} | {cell(vals[5], '.1f')} | | | |"
        )
    return "\n".join(lines) + "\n"


#: what a table shows where a run has no such figure
DASH = "\N{EN DASH}"


def cell(value: float | None, spec: str = ".2f") -> str:
    """A table cell: the figure, or a dash where the run has none (no racks, no killed
    node, no skew recorded)."""
    return DASH if value is None or math.isnan(value) else format(value, spec)


def image_bytes_sent(bed: cluster.Testbed) -> dict[str, int]:
    """Image bytes corral serve counted as sent since it started, by transport (its
    ``corral_image_bytes_sent`` metric: BitTorrent's seed, multicast's sender, the chunks
    served over HTTP), summed over images. Against the interface's egress, the rest is
    headers, control traffic and TCP's retransmissions."""
    sent: dict[str, int] = {}
    for family in text_string_to_metric_families(bed.server_get("/metrics")):
        if family.name == "corral_image_bytes_sent":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    transport = sample.labels["transport"]
                    sent[transport] = sent.get(transport, 0) + int(sample.value)
    return sent


def resent_of(r: dict[str, Any]) -> float:
    """The share of the server's TCP segments that were retransmissions (nan for runs
    recorded before the bench counted them): egress that no transport's own count shows."""
    sent, resent = r.get("tcp_segments") or (0, 0)
    return resent / sent if sent else float("nan")


def uplink_of(r: dict[str, Any]) -> float:
    """The most any rack's uplink carried in one direction, ÷ S (nan without racks)."""
    crossed = [b for pair in (r.get("uplinks") or {}).values() for b in pair]
    return max(crossed) / (r["s_mib"] * 2**20) if crossed else float("nan")


def console_sizes(bed: cluster.Testbed, names: list[str]) -> dict[str, int]:
    """Where each node's console log ends now: a run's lines come after."""
    sizes = {}
    for name in names:
        try:
            sizes[name] = (bed.nodes_dir / name / "console.log").stat().st_size
        except OSError:
            sizes[name] = 0
    return sizes


def chunks_by_http(
    bed: cluster.Testbed, since: dict[str, int], ref: str
) -> tuple[dict[str, int], dict[str, int]]:
    """(node -> chunks it took by HTTP, node -> of those, the ones its multicast session
    brought damaged) in the console lines after ``since``; nodes with none left out."""
    http: dict[str, int] = {}
    repaired: dict[str, int] = {}
    for name, offset in since.items():
        try:
            with open(bed.nodes_dir / name / "console.log", "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        found = [m for m in RECEIVED.finditer(text) if m["ref"] == ref]
        if not found:
            continue
        last = found[-1]
        by_http = int(last["multicast"] or last["swarm"] or last["http"] or 0)
        if by_http:
            http[name] = by_http
        if int(last["repaired"] or 0):
            repaired[name] = int(last["repaired"])
    return http, repaired


def wipe(bed: cluster.Testbed, names: list[str]) -> None:
    """Discard every byte of the nodes' disks: the next deployment is a full install."""
    state = bed.require_state()
    for info in state.nodes:
        if info.name in names:
            subprocess.run(["blkdiscard", "-f", info.loop], check=True, capture_output=True)
            subprocess.run(["partx", "-d", info.loop], check=False, capture_output=True)


def run_once(
    bed: cluster.Testbed,
    transport: str,
    n: int,
    version: ImageVersion,
    kill: str | None = None,
    aside: tuple[str, ...] = (),
    kind: str = "install",
    power_at: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One deployment to tb001..tbN. ``kill``: power that node off once it has half the
    image; ``aside``: nodes (slow, killed) left out of ``t_others``; ``kind``: ``install``
    (the disks wiped first: a full install) or ``diskless`` (the squashfs into RAM, the
    disks untouched); ``power_at``: seconds after the deployment's start at which the
    bench powers each node on (None: the deployment manager power-cycles them)."""
    names = [cluster.node_name(i) for i in range(1, n + 1)]

    def measured(node: str) -> bool:
        """Not the slow or the killed node: the others, whose times the scenario is about."""
        return node not in aside and node != kill

    noderange = f"tb[001-{n:03d}]"
    if kind == "install":
        wipe(bed, names)
    consoles = console_sizes(bed, names)
    egress0 = bed.server_egress_bytes()
    segments0 = bed.server_tcp_segments()
    drops0 = bed.queue_drops()
    payload0 = image_bytes_sent(bed)
    uplinks0 = bed.uplink_bytes()
    busy0, total0 = cpu_times()
    by_process = CpuByProcess()
    by_process.start()
    with db.session() as s:
        ident = new_deployment(s, image_store(HOME), noderange, version.ref, transport, kind=kind)
    powering = PowerOn(bed, power_at) if power_at is not None else None
    if powering is not None:
        powering.start()
    killed_at: float | None = None
    received: dict[str, float] = {}
    failed_after: float | None = None
    others_done_at = 0.0
    while True:
        time.sleep(0.5)
        with db.session() as s:
            d = Deployments(s).get(ident)
            now = time.time()
            for row in d.nodes:  # the agent reports "configuring" the moment it has it all
                if row.phase in AFTER_RECEIVING and row.node not in received:
                    received[row.node] = now
            if kill and killed_at is None:
                row = Deployments(s).member(ident, kill)
                if row.total and row.bytes >= row.total // 2:
                    bed.power(kill, "off")
                    killed_at = time.time()
            if (
                kill
                and killed_at
                and failed_after is None
                and Deployments(s).member(ident, kill).phase == "failed"
            ):
                failed_after = time.time() - killed_at
            others_ended = all(r.phase in FINAL for r in d.nodes if measured(r.node))
            if aside and others_ended and d.state == "running":
                # the slow node alone: its link decides when it ends, not the transport
                others_done_at = others_done_at or now
                if now - others_done_at > ASIDE_WAIT:
                    Deployments(s).cancel(ident)
                    continue
            if d.state != "running":
                rows = [(r.node, r.phase, r.started, r.finished, r.message) for r in d.nodes]
                created = d.created
                up = booted_at(s, names, created)
                break
    if powering is not None:
        powering.stop()
    busy1, total1 = cpu_times()
    cpu_seconds = by_process.stop()
    egress = bed.server_egress_bytes() - egress0
    segments = [
        now - before for now, before in zip(bed.server_tcp_segments(), segments0, strict=True)
    ]
    drops = {where: count - drops0[where] for where, count in bed.queue_drops().items()}
    payload = {
        transport: sent - payload0.get(transport, 0)
        for transport, sent in image_bytes_sent(bed).items()
        if sent > payload0.get(transport, 0)
    }
    uplinks = {
        rack: [now - before for now, before in zip(counts, uplinks0[rack], strict=True)]
        for rack, counts in bed.uplink_bytes().items()
    }
    done = [r for r in rows if r[1] == "done"]
    failed = [(r[0], r[4]) for r in rows if r[1] != "done"]
    finish = [r[3] for r in done if r[3]]
    starts = [r[2] for r in rows if r[2]]
    others = [r[3] for r in done if r[3] and measured(r[0])]
    got = [at for node, at in received.items() if measured(node)]
    http_chunks, repaired_chunks = chunks_by_http(bed, consoles, version.ref)
    return {
        "t_others": max(others) - min(starts) if others and starts else None,
        "killed_failed_after": failed_after,
        "ident": ident,
        "done": len(done),
        "failed": failed,
        "t_boot": max(finish) - created if finish else None,
        "t": max(finish) - min(starts) if finish and starts else None,
        "t_after_last": max(finish) - max(starts) if finish and starts else None,
        "t_after_up": max(finish) - max(up.values()) if finish and up else None,
        "up_skew": max(up.values()) - min(up.values()) if up else None,
        "t_received": max(got) - min(starts) if got and starts else None,
        "spread": max(finish) - min(finish) if finish else None,
        "skew": max(starts) - min(starts) if starts else None,
        "egress": egress,
        "uplinks": uplinks,
        "tcp_segments": segments,
        "queue_drops": drops,
        "payload": payload,
        "cpu": (busy1 - busy0) / max(1, total1 - total0),
        "cpu_seconds": cpu_seconds,
        "http_chunks": http_chunks,
        "repaired_chunks": repaired_chunks,
        "tcp_congestion": bed.tcp_congestion(),
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, s_bytes: int) -> str:
    nan = float("nan")
    lines = [
        f"Image stream S = {s_bytes / 2**20:.1f} MiB; node link B = {args.link}; server link "
        f"B_server = {args.server_link}; S/B = {results[-1]['s_over_b']:.1f} s. "
        "T counts from the first node's first report to the last node's completion; "
        "T_recv to the last node having the whole image (its agent then configures, "
        "syncs and unmounts); 'others' leaves out the slow or killed node.",
        "",
        "| transport | N | T (s) | T ÷ S/B | T_recv ÷ S/B | T ÷ unicast bound | egress ÷ S "
        "| TCP resent | busiest uplink ÷ S | start skew (s) | spread (s) | others' T ÷ S/B "
        "| killed node failed after (s) | host CPU | failed | valid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, sb = r["t"] or nan, r["s_over_b"]
        size = r["s_mib"] * 2**20
        lines.append(
            f"| {r['transport']} | {r['n']} | {cell(t, '.1f')} | {cell(t / sb)} "
            f"| {cell((r.get('t_received') or nan) / sb)} | {cell(t / r['bound'])} "
            f"| {cell(r['egress'] / size)} | {cell(resent_of(r), '.1%')} | {cell(uplink_of(r))} "
            f"| {cell(r.get('skew'), '.1f')} | {r['spread'] or 0:.1f} "
            f"| {cell((r.get('t_others') or nan) / sb)} "
            f"| {cell(r.get('killed_failed_after'), '.1f')} | {r['cpu']:.0%} "
            f"| {len(r['failed'])} | {'yes' if r['valid'] else 'no (CPU)'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """T / (S/B) against N per transport (runs at different B compare on this scale
    when B_server / B is the same), with the unicast bound and one copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plain = [r for r in results if "(" not in r["transport"] and r["t"]]  # no scenarios
    for transport in sorted({r["transport"] for r in plain}):
        rs = sorted((r for r in plain if r["transport"] == transport), key=lambda r: r["n"])
        ax.plot([r["n"] for r in rs], [r["t"] / r["s_over_b"] for r in rs], marker="o",
                label=transport)  # fmt: skip
    rs = sorted({r["n"]: r for r in plain}.values(), key=lambda r: r["n"])
    ax.plot([r["n"] for r in rs], [r["bound"] / r["s_over_b"] for r in rs], "k--",
            label="unicast bound")  # fmt: skip
    ax.axhline(1.0, color="k", linestyle=":", label="one copy over a node's link (S/B)")
    ax.set_xlabel("nodes (N)")
    ax.set_ylabel("time to the last node done, T ÷ S/B")
    ax.set_yscale("log")
    ax.set_title("corral deploy on the virtual cluster (B_server = 10 B)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    unwind_on_sigterm()  # kill takes the testbed down too, through the finally
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="http,rsync")
    parser.add_argument("--nodes", default="1,10,50,100", help="comma-separated N values")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--link", default="20mbit", help="each node's link B")
    parser.add_argument("--server-link", default="200mbit", help="the server's link")
    parser.add_argument("--cpu-limit", type=float, default=0.9)
    parser.add_argument("--loss", help="random loss on every node's link, e.g. 1%%")
    parser.add_argument("--slow", action="append", default=[], help="NODE=RATE, e.g. tb050=2mbit")
    parser.add_argument("--kill", help="power this node off when it has half the image")
    parser.add_argument("--label", default="", help="scenario name for the table")
    parser.add_argument(
        "--multicast-mode",
        choices=("acked", "async"),
        help="multicast_mode for the multicast transport (default: corral's)",
    )
    parser.add_argument(
        "--multicast-fec",
        help="multicast_fec for the multicast transport, e.g. 8x8/128 (default: the mode's)",
    )
    parser.add_argument(
        "--skew",
        type=float,
        help="power each node on at a random moment over this many seconds (the bench "
        "powers them; without it, or at 0, the deployment manager power-cycles them, "
        "16 at a time)",
    )
    parser.add_argument("--racks", type=int, help="put the nodes into this many racks")
    parser.add_argument("--rack-uplink", help="each rack's uplink rate, e.g. 12500kbit")
    parser.add_argument("--seed", type=int, help="seed of the --skew moments (default: random)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per transport and N")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--png", type=Path, help="write the plot here")
    parser.add_argument(
        "--results",
        type=Path,
        help="append each run's JSON line to this file; --png and --markdown then cover "
        "every run in it (earlier transports too)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/deploy.py needs root (namespaces, loop devices)", file=sys.stderr)
        return 2
    if (args.skew is not None and args.skew < 0) or args.repeat < 1:
        print("error: --skew must be >= 0 seconds and --repeat >= 1", file=sys.stderr)
        return 2
    try:
        counts = node_counts(args.nodes)
    except ValueError as exc:
        print(f"error: --nodes {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    if args.skew is not None:
        print(f"skew {args.skew:g} s, seed {seed} (--seed {seed} repeats these moments)")
    here, code = machine(), commit()
    use_home(args.link, args.server_link, args.multicast_mode or "", args.multicast_fec or "")
    version = make_image(args.size_mib)
    s_bytes = int(version.manifest["exports"]["stream"]["size"])
    b = parse_rate(args.link)
    b_server = parse_rate(args.server_link)
    bed = cluster.Testbed(db.settings())
    bed.down(forget=True)
    with db.session() as s:  # left running by an interrupted run
        for old in Deployments(s).running():
            Deployments(s).cancel(old.id)
    results: list[dict[str, Any]] = []
    try:
        bed.up(
            max(counts),
            args.link,
            server_link=args.server_link,
            loss=args.loss,
            slow=args.slow,
            disk_size="512M",
            racks=args.racks,
            rack_uplink=args.rack_uplink,
        )
        with db.inventory() as inv:
            if not inv.exists("profile", "bench"):
                inv.add("profile", [ProfileSpec(name="bench", variables={"bootloader": "none"})])
            inv.update("group", [cluster.GROUP], {"profiles": ["bench"]})
        if args.skew:
            power_by_bench([cluster.node_name(i) for i in range(1, max(counts) + 1)])
        for transport in args.transports.split(","):
            for n in counts:
                aside = tuple(x.split("=")[0] for x in args.slow)
                names = [cluster.node_name(i) for i in range(1, n + 1)]
                runs = []
                for k in range(args.repeat):
                    run_seed = seed + k
                    power_at = power_schedule(names, args.skew, run_seed) if args.skew else None
                    load0 = os.getloadavg()
                    r = run_once(bed, transport, n, version, args.kill, aside, power_at=power_at)
                    s_over_b = s_bytes * 8 / b
                    mode = f"[{args.multicast_mode}]" if args.multicast_mode else ""
                    r.update(
                        transport=transport
                        + (mode if transport == "multicast" else "")
                        + (f" ({args.label})" if args.label else ""),
                        multicast_mode=args.multicast_mode,
                        multicast_fec=args.multicast_fec,
                        n=n,
                        s_mib=s_bytes / 2**20,
                        s_over_b=s_over_b,
                        bound=max(s_over_b, n * s_bytes * 8 / b_server),
                        valid=r["cpu"] <= args.cpu_limit,
                        link=args.link,
                        server_link=args.server_link,
                        measured=time.strftime("%Y-%m-%d %H:%M"),
                        commit=code,
                        machine=here,
                        skew_window=args.skew,
                        racks=args.racks,
                        rack_uplink=args.rack_uplink,
                        seed=run_seed if args.skew else None,
                        run=k + 1,
                        load=[load0[0], os.getloadavg()[0]],
                    )
                    results.append(r)
                    runs.append(r)
                    print(json.dumps(r), flush=True)
                if args.repeat > 1 or args.skew is not None:
                    print(f"\n{transport}, N = {n}, skew {args.skew or 0:g} s:")
                    print(summary(runs), flush=True)
    finally:
        bed.down(forget=True)
    if args.results:
        with open(args.results, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        results = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    table = markdown(results, args, s_bytes)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.png:
        plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
