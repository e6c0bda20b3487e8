"""``bench/deploy.py`` (and ``bench/diskless.py``, which shares its ``--nodes``) refuses
bad arguments with a one-line error and exit 2, before it builds an image or brings a
testbed up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parallel_safe,
    pytest.mark.skipif(os.geteuid() != 0, reason="bench/deploy.py refuses to run but as root"),
]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "deploy.py"
DISKLESS = BENCH.with_name("diskless.py")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--nodes", "ten"], "--nodes 'ten': give node counts of 1 or more"),
        (["--nodes", "0,10"], "--nodes '0,10': give node counts of 1 or more"),
        (["--skew", "-5"], "--skew must be >= 0 seconds"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(argv: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--transports", "chain", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]


def test_the_diskless_bench_refuses_bad_node_counts_alike() -> None:
    done = subprocess.run(
        [sys.executable, str(DISKLESS), "--transports", "chain", "--nodes", "ten"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == "error: --nodes 'ten': give node counts of 1 or more, e.g. 10,100"
