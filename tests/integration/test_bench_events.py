"""``bench/events.py`` at a small scale, so that it cannot rot: simulated nodes report to
a real ``corral serve`` while SSE viewers read the stream, and no event may be lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "events.py"


def test_the_event_bench_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    argv = [sys.executable, str(BENCH), "--nodes", "20", "--seconds", "5", "--clients", "2"]
    argv += ["--home", str(tmp_path / "home"), "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert summary["reports_sent"] == summary["reports_accepted"] > 20
    assert summary["request_errors"] == 0
    assert summary["events_stored"] > 20  # each node's booted and its phase changes
    assert summary["lost"] == 0 and summary["viewer_errors"] == []
    assert summary["latency_p99_ms"] is not None
    assert "report -> stream p99" in done.stdout
