"""Benchmark: power-cycle 100 emulated BMCs that take 1 s to answer a power request.

Target: all 100 acknowledged within 10 s (issue 16).

The BMCs are sushy-tools' Redfish emulator (tests/redfish_emulator.py, started by
tests/bmc_rigs.py) serving N fake systems behind HTTP basic authentication; corral drives
each system as a node of its own, through corral.power.power (the redfish driver, sushy),
with the network boot device set once, as a deployment does. Every power request (the
POST to a system's ComputerSystem.Reset action) is answered ``--answer`` seconds after
it arrives (a WSGI middleware sleeps, without holding anything the other requests need);
the other requests (service root, system, boot override, the state read afterwards) are
answered as fast as the emulator can.

Why that models a real BMC: a BMC acknowledges a reset only once its firmware has acted
on it (the power sequencer's handshake, a second or so on common servers), while reading
a resource comes from memory; and each BMC has its own CPU, so a hundred of them answer
in parallel. Here one emulator process stands for all of them, on this machine's cores
with corral itself: its CPU (and bcrypt's, at the least cost, 4, for the same reason) is
work no real BMC fleet would put on the server, so the figures are on the pessimistic
side of what a fleet of real 1-s BMCs gives.

Measured, per pool size (the most nodes in flight), ``--repeat`` times: the time from the
call to the last node acknowledged (all Outcomes in), the slowest node's own time, and
the failures; printed as median (worst) over the repeats.

    .venv/bin/python bench/power.py [--bmcs 100] [--pools 8,32,100] [--answer 1.0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from corral.power import Bmc, Outcome, power

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the emulator rig is shared with the tests

from tests.bmc_rigs import PASSWORD, USER, redfish_bmcs  # noqa: E402

TARGET = 10.0


@dataclass
class Run:
    pool: int
    seconds: float  # from the call to the last node acknowledged
    slowest: float  # the slowest node's own time
    failures: list[Outcome]


def cycle(bmcs: list[Bmc], pool: int, timeout: float) -> Run:
    started = time.monotonic()
    outcomes = power(bmcs, "cycle", netboot=True, pool=pool, timeout=timeout)
    seconds = time.monotonic() - started
    return Run(pool, seconds, max(o.seconds for o in outcomes), [o for o in outcomes if not o.ok])


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bmcs", type=int, default=100, help="emulated BMCs (systems) [100]")
    parser.add_argument(
        "--pools", default="8,32,100", help="pool sizes to try, comma-separated [8,32,100]"
    )
    parser.add_argument(
        "--answer",
        type=float,
        default=1.0,
        help="seconds a BMC takes to acknowledge a power request [1]",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per pool size; median and worst are reported [3]",
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="per-node deadline in seconds [20]"
    )
    args = parser.parse_args()
    pools = [int(p) for p in args.pools.split(",")]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    print(f"bench/power.py at {commit or '?'}: {args.bmcs} Redfish BMCs (sushy-tools, one"
          f" process) answering power requests in {args.answer:g} s; cycle with network"
          f" boot once; {args.repeat} runs per pool; target <= {TARGET:g} s")  # fmt: skip
    runs: dict[int, list[Run]] = {p: [] for p in pools}
    with (
        tempfile.TemporaryDirectory(prefix="corral-bench-power-") as tmp,
        redfish_bmcs(Path(tmp), args.bmcs, answer_delay=args.answer, prompt=False) as rig,
    ):
        bmcs = [
            Bmc(f"n{i:03d}", "redfish", rig.url, USER, PASSWORD, system=s)
            for i, s in enumerate(rig.systems)
        ]
        cycle(bmcs[:4], 4, args.timeout)  # warm-up: the emulator's first requests
        for k in range(args.repeat):
            for pool in pools:
                run = cycle(bmcs, pool, args.timeout)
                runs[pool].append(run)
                print(f"  run {k + 1} pool {pool:3d}: {run.seconds:6.2f} s, slowest node"
                      f" {run.slowest:.2f} s, {len(run.failures)} failed", flush=True)  # fmt: skip
                for failure in run.failures[:3]:
                    print(f"    {failure.node}: {failure.why}: {failure.reason}")
    print()
    print(" pool  BMCs  all acknowledged (s)  slowest node (s)  failures  target")
    for pool in pools:
        done = [r.seconds for r in runs[pool]]
        slowest = [r.slowest for r in runs[pool]]
        failed = sum(len(r.failures) for r in runs[pool])
        verdict = "met" if max(done) <= TARGET and not failed else "missed"
        print(f" {pool:4d}  {args.bmcs:4d}  {cell(done):>21}  {cell(slowest):>16}  {failed:8d}"
              f"  {verdict}")  # fmt: skip
    print("\n(median (worst) of the runs)")


if __name__ == "__main__":
    main()
