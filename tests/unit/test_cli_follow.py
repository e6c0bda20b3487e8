"""`corral deploy --wait` / `deployment show --follow`: the live view's last line ends,
so that what is printed next starts on a line of its own."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from corral.cli import deploy


def test_the_live_view_ends_its_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    data: dict[str, Any] = {
        "id": 1,
        "state": "done",
        "nodes": [{"node": "n1", "bytes": 15_000, "total": 15_000, "phase": "done", "message": ""}],
    }
    monkeypatch.setattr(deploy, "_snapshot", lambda ident: data)
    row = {"node": "n1", "state": "deployed", "phase": "done", "bytes": 15_000, "total": 15_000}
    monkeypatch.setattr(deploy.LocalFeed, "snapshot", lambda self: [row])
    stream = io.StringIO()  # stderr redirected to a file or a pipe: not a terminal
    monkeypatch.setattr(deploy, "err", Console(file=stream, width=80))
    monkeypatch.setattr(deploy, "out", Console(file=io.StringIO(), width=80))
    assert deploy.follow(1, interval=0) == 0
    assert stream.getvalue().endswith("\n")
