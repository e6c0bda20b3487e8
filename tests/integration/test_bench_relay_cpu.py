"""``bench/relay_cpu.py`` at a small scale, so that it cannot rot: two chain receivers pull
a small image through each other from a head on loopback, and it says what that cost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "relay_cpu.py"


def test_the_relay_cpu_bench_measures_each_run_and_sums_them_up() -> None:
    argv = [sys.executable, str(BENCH), "--nodes", "1,2", "--size-mib", "8", "--repeat", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| [12] \| 8 \|", line)]
    assert len(rows) == 4
    summary = [line for line in done.stdout.splitlines() if line.startswith("N = ")]
    assert [line.split(":")[0] for line in summary] == ["N = 1", "N = 2"]
    assert all("ms of CPU per MiB a node, median (worst)" in line for line in summary)
    for bad, why in ((["--nodes", "two"], "give numbers"), (["--size-mib", "1"], "at least 4")):
        refused = subprocess.run(
            [sys.executable, str(BENCH), *bad], capture_output=True, text=True, check=False
        )
        assert refused.returncode == 2 and why in refused.stderr.splitlines()[-1]
