"""Benchmark: full and incremental `corral sync` of a large cluster.

Fills a fresh database with N nodes (the profiles and groups of examples/cluster.yaml),
times a full sync into an empty directory, changes one node, and times the incremental
sync. Prints one JSON line. The sync is timed in-process (the library call that the CLI
makes); `cli_incremental_s` adds the wall time of the whole `corral sync` command,
interpreter start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    os.environ["CORRAL_HOME"] = str(work / "home")
    from corral.inventory.clusterfile import apply_cluster, load_cluster
    from corral.inventory.db import inventory, session, settings
    from corral.render.sync import Syncer

    data = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    n_gpu = max(1, args.nodes // 10)
    data["nodes"] = [
        {
            "name": f"n[00001-{args.nodes - n_gpu:05d}]",
            "groups": ["compute"],
            "interfaces": [{"mac": "52:54:00:10:00:00", "ip": "10.64.0.1", "netmask": "10"}],
        },
        {
            "name": f"g[0001-{n_gpu:04d}]",
            "groups": ["gpu"],
            "interfaces": [
                {"name": "eth0", "mac": "52:54:00:20:00:00"},
                {"name": "eth1", "mac": "52:54:00:30:00:00"},
                {
                    "name": "bond0",
                    "bond_members": ["eth0", "eth1"],
                    "ip": "10.96.0.1",
                    "netmask": "10",
                },
            ],
        },
    ]
    start = time.perf_counter()
    with inventory() as inv:
        apply_cluster(inv, load_cluster(yaml.safe_dump(data), "bench"))
    fill = time.perf_counter() - start

    root = work / "tftpboot"

    def sync() -> tuple[float, object]:
        t0 = time.perf_counter()
        with session() as s:
            report = Syncer(settings(), s, root).run()
        return time.perf_counter() - t0, report

    full_s, full = sync()
    with inventory() as inv:
        inv.update("node", ["n00042"], {"variables": {"rack": "r7"}, "install_method": "image"})
    inc_s, inc = sync()

    with inventory() as inv:
        inv.update("node", ["n00043"], {"install_method": "image"})
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "corral", "sync", "--root", str(root)],
        check=True,
        capture_output=True,
    )
    cli_s = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "fill_s": round(fill, 2),
                "full_sync_s": round(full_s, 2),
                "full_written": full.written,  # type: ignore[attr-defined]
                "incremental_sync_ms": round(inc_s * 1000, 1),
                "incremental_written": inc.written,  # type: ignore[attr-defined]
                "incremental_removed": inc.removed,  # type: ignore[attr-defined]
                "cli_incremental_s": round(cli_s, 2),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
