"""Shared fixtures: a fresh corral home per test, and the inventory inside it; and the
order of the modules marked ``minutes``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.inventory import db
from corral.inventory.clusterfile import apply_cluster, load_cluster
from corral.inventory.store import Inventory

DATA = Path(__file__).parent / "data"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "home"
    monkeypatch.setenv("CORRAL_HOME", str(path))
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    db.close()
    yield path
    db.close()


@pytest.fixture
def settings(home: Path) -> Settings:
    return db.settings()


@pytest.fixture
def inv(home: Path) -> Iterator[Inventory]:
    """An inventory in one open transaction (rolled back if the test raises)."""
    with db.inventory() as inventory:
        yield inventory


@pytest.fixture
def fixture_cluster(home: Path) -> None:
    """The small cluster of tests/data/cluster.yaml, committed."""
    with db.inventory() as inventory:
        apply_cluster(inventory, load_cluster((DATA / "cluster.yaml").read_text(), "fixture"))


def corral(*args: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``corral`` entry point in a subprocess."""
    env = dict(os.environ, CORRAL_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules marked ``minutes(N)`` first, the longest first, the others after them in
    their order: ``make test`` runs the VM tests two modules at a time, in this order
    (``--no-loadscope-reorder``), and a long module started last would keep one worker
    busy alone at the end."""

    def minutes(item: pytest.Item) -> float:
        marker = item.get_closest_marker("minutes")
        return -float(marker.args[0]) if marker else 0.0

    items.sort(key=minutes)
