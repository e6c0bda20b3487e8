"""`corral watch`'s board: what it shows first, and that 250 nodes fit a terminal."""

from __future__ import annotations

import io
import time

from rich.console import Console

from corral.cli.watch import Board, _sse, render


def _nodes(count: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(count):
        state = "installed" if i % 5 == 0 else "installing"
        rows.append(
            {
                "node": f"n{i:03d}",
                "state": state,
                "phase": "receiving",
                "message": "",
                "since": "2026-12-03T12:00:00+00:00",
                "deployment": 1,
                "bytes": i * 1000,
                "total": 250_000,
                "reason": None,
            }
        )
    rows[min(200, count - 1)] |= {
        "state": "failed",
        "phase": "failed",
        "reason": "silent",
        "message": "deployment 1: no report for 25 s in phase receiving",
    }
    return rows


def screen(board: Board, height: int = 40, width: int = 140) -> str:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=None)
    console.print(render(board, "deployment 1", height, width))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_250_nodes_fit_with_failures_first_and_the_rest_counted() -> None:
    board = Board()
    board.load(_nodes(250))
    text = screen(board)
    lines = text.splitlines()
    assert len(lines) <= 40
    assert "failed 1  ·  installing 200  ·  installed 49" in text
    first_row = next(line for line in lines if line.startswith("n") and line[1].isdigit())
    assert first_row.startswith("n200") and "[silent]" in first_row
    assert "… and" in lines[-1] and "more" in lines[-1]


def test_progress_moves_the_bar_and_gives_a_rate() -> None:
    board = Board()
    board.load(_nodes(3))
    row = board.rows["n001"]
    row.samples.clear()
    row.samples.append((time.monotonic() - 2, 0))
    board.progress(
        {"node": "n001", "deployment": 1, "phase": "receiving", "bytes": 200_000, "total": 250_000}
    )
    assert row.bytes == 200_000
    assert row.rate(time.monotonic()) is not None
    assert 0 < (row.eta(time.monotonic()) or 0) < 5
    board.event({"node": "n001", "phase": "configuring", "message": "identity"})
    assert board.stale and row.phase == "configuring"


def test_sse_lines_become_messages() -> None:
    lines = [
        "retry: 2000",
        "",
        "id: 7",
        "event: event",
        'data: {"node": "n1"}',
        "",
        ": keep-alive",
        "",
        "event: progress",
        'data: {"bytes": 3}',
        "",
    ]
    assert list(_sse(iter(lines))) == [
        ("event", {"node": "n1"}, "7"),
        ("progress", {"bytes": 3}, None),
    ]
