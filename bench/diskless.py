"""Benchmark: a diskless boot storm, N virtual nodes booting one image from RAM at once.

On the virtual cluster (``corral testbed``, as ``bench/deploy.py``), for each transport
and each N, marks tb001..tbN diskless and boots them into an image whose squashfs export
is at least 128 MiB of incompressible data: one deployment of kind ``diskless``, which
power-cycles the nodes; each node's agent receives the squashfs into a tmpfs, mounts it
under a tmpfs overlay in a mount namespace of its own, writes its identity and reports
``done`` (a testbed node does everything but start the image's systemd). Measured:

- T: from the deployment's creation (the power-on: corral power-cycles the nodes) to the
  last node's ``done`` (its root mounted, its identity written), as T ÷ S/B, S being the
  squashfs's size and B a node's link; T_report counts from the first node's first
  report instead, and the skew is the spread of the nodes' first reports (the host boots
  every node's agent on its two cores);
- egress ÷ S: the server interface's tx bytes (control traffic included);
- first-try success: the nodes ``done`` in that one deployment ÷ N (a failed node is not
  retried), with each failure's reason;
- host CPU over the run, also by process; a run above ``--cpu-limit`` measured the host,
  not the transport, and is marked invalid.

``--repeat K`` boots K times per transport and N; the table gives the median and the
worst run. One JSON line per run on stdout (with the commit, the date and the machine),
a Markdown table (``--markdown``); ``--results FILE`` collects runs over invocations.

Link rates: ``--link 4mbit --server-link 40mbit`` by default (S/B = 272 s for the 130 MiB
squashfs), for 100 nodes. A diskless node only checks what it receives and writes it to
a tmpfs, yet the host plays every node on its two cores: at 8 Mbit/s, multicast to 100
nodes kept the host 92 % busy (agents 150, udp-receivers 124, softirq 64, udp-sender 51
core-seconds) and T grew with it: that run measured the host. The work is about 490
core-seconds per 100 copies of S whatever B is, so at 4 Mbit/s it takes about half the
host. Fewer nodes can run faster (T ÷ S/B is on one scale when B_server ÷ B is the same;
the table gives B per row). B_server = 10 B, as in every ``bench/deploy.py`` run.

RAM: the nodes hold the squashfs in the host's RAM (bittorrent twice: libtorrent's
scratch lies in the same tmpfs until the node stops seeding); a transport and N that
would not fit in the host's available memory are skipped and said so, rather than let
the kernel's OOM killer choose among the nodes (and other users' processes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# bench/ is not a package: this script runs as bench/diskless.py, beside deploy.py
from deploy import make_image, node_counts, run_once, use_home

from corral.deploy.store import Deployments
from corral.images.exports import Chunked
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.inventory.schema import ProfileSpec
from corral.run import unwind_on_sigterm
from corral.testbed import cluster
from corral.testbed.cluster import parse_rate

REPO = Path(__file__).resolve().parents[1]
#: A node's processes besides its image: its agent took 45 MiB RSS and udp-receiver 8 MiB
#: in a multicast run of 100 nodes.
NODE_RSS = 56 << 20
#: Share of the host's available memory the nodes may take.
RAM_SHARE = 0.9


def machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    total = int(meminfo[meminfo.index("MemTotal:") + 1]) << 10
    return {"cores": os.cpu_count(), "ram_gib": round(total / 2**30, 1)}


def available_ram() -> int:
    meminfo = Path("/proc/meminfo").read_text().split()
    return int(meminfo[meminfo.index("MemAvailable:") + 1]) << 10


def ram_needed(transport: str, n: int, s_bytes: int) -> int:
    """The host RAM n diskless nodes hold at the end of a boot: each its squashfs in a
    tmpfs (bittorrent a second copy, its scratch) and its processes."""
    copies = 2 if transport == "bittorrent" else 1
    return n * (copies * s_bytes + NODE_RSS)


def commit() -> str:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "bench"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def power_off(bed: cluster.Testbed, names: list[str]) -> None:
    """End what still runs on the nodes (a chain relay, a seeder lingering): its RAM and
    CPU would count in the next run."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda node: bed.power(node, "off"), names))


def boot_once(
    bed: cluster.Testbed, transport: str, n: int, version: ImageVersion, s_bytes: int, b: int
) -> dict[str, Any]:
    """One boot of tb001..tbN; ``run_once``'s figures plus the boot's own."""
    r = run_once(bed, transport, n, version, kind="diskless")
    power_off(bed, [cluster.node_name(i) for i in range(1, n + 1)])
    s_over_b = s_bytes * 8 / b
    t_power = r.pop("t_boot")  # deploy.py's name: from the deployment's creation
    return {
        "t_power": t_power,
        "t_power_over_sb": t_power / s_over_b if t_power else None,
        "t_report_over_sb": r["t"] / s_over_b if r["t"] else None,
        "t_received_over_sb": r["t_received"] / s_over_b if r["t_received"] else None,
        "egress_over_s": r["egress"] / s_bytes,
        "first_try": r["done"] / n,
        "s_over_b": s_over_b,
        **r,
    }


def cell(group: list[dict[str, Any]], name: str, fmt: str, higher_is_worse: bool = True) -> str:
    """The median (the worst) of one figure over a group of runs; the figure alone for
    one run."""
    values = [r[name] if r[name] is not None else float("nan") for r in group]
    if len(values) == 1:
        return format(values[0], fmt)
    worst = max(values) if higher_is_worse else min(values)
    return f"{statistics.median(values):{fmt}} ({worst:{fmt}})"


def markdown(results: list[dict[str, Any]]) -> str:
    runs = [r for r in results if "skipped" not in r]
    if not runs:
        return "no runs\n"
    lines = [
        f"Squashfs S = {runs[0]['s_mib']:.1f} MiB; B a node's link, B_server the server's. "
        "T: from the power-on (the deployment's creation) to the last node's root mounted "
        "and identity written (done); T_report from the first node's first report. "
        "Each cell: median (worst) of the runs.",
        "",
        "| transport | N | B / B_server | S/B (s) | runs | T (s) | T ÷ S/B | T_report ÷ S/B "
        "| start skew (s) "
        "| egress ÷ S | first try | host CPU | valid | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["transport"], r["n"], r["link"], r["server_link"]) for r in runs})
    for transport, n, link, server_link in keys:
        group = [
            r
            for r in runs
            if (r["transport"], r["n"], r["link"], r["server_link"])
            == (transport, n, link, server_link)
        ]
        cells = [
            cell(group, "t_power", ".1f"),
            cell(group, "t_power_over_sb", ".2f"),
            cell(group, "t_report_over_sb", ".2f"),
            cell(group, "skew", ".1f"),
            cell(group, "egress_over_s", ".2f"),
            cell(group, "first_try", ".0%", higher_is_worse=False),
            cell(group, "cpu", ".0%"),
            f"{sum(1 for r in group if r['valid'])}/{len(group)}",
            ", ".join(sorted({r["commit"] for r in group})),
        ]
        rates = f"{link} / {server_link}"
        head = f"| {transport} | {n} | {rates} | {group[0]['s_over_b']:.0f} | {len(group)} | "
        lines.append(head + " | ".join(cells) + " |")
    failures = [
        f"- {r['transport']} N = {r['n']} at {r['link']} ({r['date']}): {node}: {why}"
        for r in runs
        for node, why in r["failed"]
    ]
    skipped = [
        f"- {r['transport']} N = {r['n']}: {r['skipped']}" for r in results if "skipped" in r
    ]
    if failures:
        lines += ["", "Nodes that did not boot on the first try:", "", *failures]
    if skipped:
        lines += ["", "Not run:", "", *skipped]
    return "\n".join(lines) + "\n"


def each_run(
    args: argparse.Namespace, counts: list[int], s_bytes: int, run: Callable[[str, int], Any]
) -> list[dict[str, Any]]:
    """Every transport, N and repeat, skipping those the host's RAM cannot hold."""
    results: list[dict[str, Any]] = []
    for transport in args.transports.split(","):
        for n in counts:
            need = ram_needed(transport, n, s_bytes)
            room = int(available_ram() * RAM_SHARE)
            if need > room:
                skip = {
                    "transport": transport,
                    "n": n,
                    "skipped": f"needs about {need / 2**30:.1f} GiB of RAM for the nodes, "
                    f"the host has {room / 2**30:.1f} GiB to give",
                }
                results.append(skip)
                print(json.dumps(skip), flush=True)
                continue
            for k in range(args.repeat):
                r = run(transport, n)
                r.update(transport=transport, n=n, repeat=k + 1)
                results.append(r)
                print(json.dumps(r), flush=True)
    return results


def main() -> int:
    unwind_on_sigterm()  # kill takes the testbed down too, through the finally
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="http,multicast,chain,bittorrent")
    parser.add_argument("--nodes", default="1,10,50,100", help="comma-separated N values")
    parser.add_argument(
        "--size-mib", type=int, default=132, help="the image tree (the squashfs: about 130 MiB)"
    )
    parser.add_argument("--link", default="4mbit", help="each node's link B")
    parser.add_argument("--server-link", default="40mbit", help="the server's link")
    parser.add_argument("--cpu-limit", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=3, help="boots per transport and N")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument(
        "--results",
        type=Path,
        help="append each run's JSON line to this file; --markdown then covers every run in it",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/diskless.py needs root (namespaces, mounts)", file=sys.stderr)
        return 2
    try:
        counts = node_counts(args.nodes)
    except ValueError as exc:
        print(f"error: --nodes {exc}", file=sys.stderr)
        return 2
    use_home(args.link)
    version = make_image(args.size_mib, exports=("stream", "squashfs"))
    s_bytes = int(Chunked(version, "squashfs").index()["size"])
    b = parse_rate(args.link)
    stamp = {
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "link": args.link,
        "server_link": args.server_link,
        "s_bytes": s_bytes,
        "s_mib": s_bytes / 2**20,
    }
    bed = cluster.Testbed(db.settings())
    bed.down(forget=True)
    with db.session() as s:  # left running by an interrupted run
        for old in Deployments(s).running():
            Deployments(s).cancel(old.id)

    def run(transport: str, n: int) -> dict[str, Any]:
        r = boot_once(bed, transport, n, version, s_bytes, b)
        r.update(stamp, valid=r["cpu"] <= args.cpu_limit)
        return r

    try:
        bed.up(max(counts), args.link, server_link=args.server_link, disk_size="64M")
        names = [cluster.node_name(i) for i in range(1, max(counts) + 1)]
        with db.inventory() as inv:
            if not inv.exists("profile", "bench"):
                inv.add("profile", [ProfileSpec(name="bench", variables={"bootloader": "none"})])
            inv.update("group", [cluster.GROUP], {"profiles": ["bench"]})
            inv.update("node", names, {"install_method": "diskless"})
        results = each_run(args, counts, s_bytes, run)
    finally:
        bed.down(forget=True)
    if args.results:
        with open(args.results, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        results = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
