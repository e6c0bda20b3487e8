"""``bench/tracker.py`` at a small scale, so that it cannot rot: a real tracker in a child
process answers announces and ``/pending`` questions from members' own loopback
addresses, and none may fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "tracker.py"


def test_the_tracker_bench_answers_every_member() -> None:
    argv = [sys.executable, str(BENCH), "--nodes", "50", "--requests", "50", "--clients", "4"]
    argv += ["--rack-size", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    assert figures["nodes"] == 50 and figures["failed"] == 0
    # 10 racks of 5: a node's lane partners are 1, 2, 4 and 8 racks away either side
    assert figures["lane_partners"] == 6
    assert figures["announce_ms"] > 0 and figures["pending_ms"] > 0
    assert figures["interval"] == 10 and figures["every"] == 5.0  # the usual rates at 50
    assert "| 50 | " in done.stdout
    bad = subprocess.run([*argv[:2], "--nodes", "ten"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "give node counts" in bad.stderr.splitlines()[-1]
