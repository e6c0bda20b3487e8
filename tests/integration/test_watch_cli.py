"""`corral watch` as an administrator runs it, against a real corral serve app: the
nodes with their states and failures, and a clear error and exit 1 when the server is
down or refuses the token."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent import phases
from corral.config import Settings
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.fakes import free_port
from tests.integration.conftest import serving

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


@pytest.fixture
def url(fixture_cluster: None, settings: Settings) -> Iterator[str]:
    with serving(create_app(BootService(settings, db.engine()), "admin-secret")) as url:
        yield url


def watch(home: Path, *args: str, token: str = "admin-secret") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CORRAL_HOME=str(home), CORRAL_API_TOKEN=token, COLUMNS="150")
    return subprocess.run(
        [sys.executable, "-m", "corral", "watch", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_watch_shows_the_nodes_failures_first(home: Path, url: str) -> None:
    with db.session() as s:
        states = NodeStates(s)
        states.record("c01", phases.BOOTED, "ramdisk up", "test")
        states.record("img01", phases.FAILED, "no disk", "corral", reason=phases.REFUSED)
    shown = watch(home, "--once", "--server", url)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "failed 1" in lines[1]
    rows = [line for line in lines if line[:1].isalpha() and not line.startswith("node ")]
    assert rows[1].startswith("img01") and "[refused] no disk" in rows[1]
    assert any(line.startswith("c01") and "booted" in line for line in rows)
    some = watch(home, "c01", "--once", "--server", url)
    assert "1 nodes" in some.stdout


def test_watch_says_when_the_server_is_down_or_refuses(home: Path, url: str) -> None:
    down = watch(home, "--once", "--server", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot reach corral serve at http://127.0.0.1:")
    assert "hint: start it (corral serve)" in down.stderr
    refused = watch(home, "--once", "--server", url, token="wrong")
    assert refused.returncode == 1
    assert "refused the admin token" in refused.stderr
    unknown = watch(home, "zz9", "--once", "--server", url)
    assert unknown.returncode == 1 and "unknown node 'zz9'" in unknown.stderr


def test_node_history_tells_what_happened_and_why(
    home: Path, fixture_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import corral

    monkeypatch.setenv("COLUMNS", "160")
    with db.session() as s:
        states = NodeStates(s)
        states.record("c01", phases.BOOTED, "ramdisk up", "10.0.0.11")
        states.record(
            "c01", phases.FAILED, "disk vanished", "10.0.0.11", log="sda: I/O error\nabort"
        )
    shown = corral("node", "history", "c01", "--logs", home=home)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["time", "node", "phase", "source", "message"]
    assert "booted" in lines[1] and "ramdisk up" in lines[1]
    assert "[node-error, in booted] disk vanished" in lines[2]
    assert "sda: I/O error" in shown.stdout
    bad = corral("node", "history", "--since", "yesterday", home=home)
    assert bad.returncode != 0 and "bad since 'yesterday'" in bad.stderr
