"""``bench/power.py`` at a small scale, so that it cannot rot: a few emulated Redfish BMCs
answering their power requests late, cycled through two pool sizes, none failing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("sushy_tools") is None,
        reason="needs sushy-tools (pip install -e '.[dev]')",
    ),
]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "power.py"


def test_the_power_bench_cycles_every_bmc() -> None:
    argv = [sys.executable, str(BENCH), "--bmcs", "6", "--pools", "2,6", "--answer", "0.3"]
    argv += ["--repeat", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().endswith("met")]
    assert [(row[0], row[1], row[-2]) for row in rows] == [("2", "6", "0"), ("6", "6", "0")]
    # three waves of 0.3 s through 2 slots, one through 6
    assert float(rows[0][2]) >= 0.9 and float(rows[1][2]) >= 0.3
