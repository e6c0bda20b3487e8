"""``scripts/demo.sh`` empties its directory first: never the one that holds the clone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo runs as root, and says so first")
def test_the_demo_will_not_empty_the_directory_that_holds_its_clone(tmp_path: Path) -> None:
    # a clone in /tmp/corral-demo, the demo's default directory, was emptied by the demo
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(DEMO, clone / "scripts" / "demo.sh")
    kept = tmp_path / "kept"
    kept.write_text("mine")
    done = subprocess.run(
        ["bash", str(clone / "scripts" / "demo.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {tmp_path} holds this clone") and "DEMO_DIR=" in error
    assert kept.read_text() == "mine" and (clone / "scripts" / "demo.sh").exists()
