"""``corral watch``: the nodes live, full screen, from ``corral serve``'s REST API (local
or remote, with the admin token); ``corral deploy --wait`` and ``corral boot`` show the
same view.

The view starts from one snapshot (``GET /api/v1/status``) and then follows the event
stream: progress reports move the bars, and a node event (a phase change, a failure)
fetches the snapshot again, at most once a second, for the states the server derives.
Nothing is polled per node.

At 250 nodes a terminal shows a fraction of them, so rows are ordered by what needs the
administrator: failures first, then the nodes on their way (the slowest first), then the
rest, and what does not fit is counted on the last line.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from corral.cli.common import err, human_size, out, settings
from corral.errors import CorralError
from corral.inventory.state import (
    ARMED,
    BOOTING,
    DEPLOYED,
    DISCOVERED,
    FAILED,
    INSTALLED,
    INSTALLING,
    RUNNING,
)

#: States in the order the summary and the rows show them: what needs a look first.
STATE_ORDER = (FAILED, INSTALLING, BOOTING, DEPLOYED, ARMED, INSTALLED, RUNNING, DISCOVERED)
STATE_STYLE = {
    FAILED: "bold red",
    INSTALLING: "cyan",
    BOOTING: "cyan",
    DEPLOYED: "blue",
    ARMED: "yellow",
    INSTALLED: "green",
    RUNNING: "green",
    DISCOVERED: "magenta",
}
#: Seconds of progress a node's rate is measured over.
RATE_WINDOW = 10.0
#: The least time between two snapshots fetched because of events.
REFRESH = 1.0
#: Seconds the stream may stay down before ``corral watch`` gives up.
GIVE_UP = 30.0


class WatchError(CorralError):
    """The server cannot be watched: down, wrong URL, wrong token."""

    exit_code = 1


@dataclass
class Row:
    node: str
    state: str
    phase: str | None = None
    message: str | None = None
    since: str | None = None
    deployment: int | None = None
    bytes: int = 0
    total: int = 0
    reason: str | None = None
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def rate(self, now: float) -> float | None:
        """Bytes a second over the last :data:`RATE_WINDOW` seconds."""
        recent = [(t, b) for t, b in self.samples if now - t <= RATE_WINDOW]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None
        return max(0.0, (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0]))

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        if not rate or not self.total or self.bytes >= self.total:
            return None
        return (self.total - self.bytes) / rate


class Board:
    """What the view shows: the nodes' rows, moved by snapshots and stream messages."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.stale = False  # an event arrived: the snapshot is due again
        self.status = ""  # the connection's state, when it is not well

    def load(self, nodes: list[dict[str, Any]]) -> None:
        seen = set()
        for data in nodes:
            name = data["node"]
            seen.add(name)
            row = self.rows.get(name) or Row(name, data["state"])
            self.rows[name] = row
            for key in ("state", "phase", "message", "since", "deployment", "reason"):
                setattr(row, key, data.get(key))
            if data.get("total"):
                row.bytes, row.total = data["bytes"], data["total"]
                row.samples.append((time.monotonic(), row.bytes))
        for gone in set(self.rows) - seen:
            del self.rows[gone]

    def progress(self, data: dict[str, Any]) -> None:
        row = self.rows.get(data.get("node") or "")
        if row is None:
            return
        row.phase, row.deployment = data.get("phase", row.phase), data.get("deployment")
        row.bytes, row.total = int(data.get("bytes", 0)), int(data.get("total", 0)) or row.total
        row.samples.append((time.monotonic(), row.bytes))

    def event(self, data: dict[str, Any]) -> None:
        row = self.rows.get(data.get("node") or "")
        if row is None:
            return
        row.phase, row.message = data.get("phase"), data.get("message")
        if data.get("reason"):
            row.reason = data["reason"]
        self.stale = True

    def counts(self) -> list[tuple[str, int]]:
        tally: dict[str, int] = {}
        for row in self.rows.values():
            tally[row.state] = tally.get(row.state, 0) + 1
        order = {s: i for i, s in enumerate(STATE_ORDER)}
        return sorted(tally.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))

    def ordered(self) -> list[Row]:
        """Failures, then the nodes on their way (least done first), then the rest."""
        order = {s: i for i, s in enumerate(STATE_ORDER)}

        def key(row: Row) -> tuple[int, float, str]:
            done = row.bytes / row.total if row.total else 0.0
            return (order.get(row.state, 99), done, row.node)

        return sorted(self.rows.values(), key=key)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _since(iso: str | None) -> str:
    """``14:02:07`` of an ISO 8601 time, as people read it."""
    if not iso:
        return ""
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return iso


def render(board: Board, title: str, height: int, width: int) -> RenderableType:
    """The screen: title, a summary per state, the overall progress, and as many node rows
    as fit in ``height`` lines."""
    now = time.monotonic()
    header = Text()
    header.append(title, "bold")
    header.append(f"   {time.strftime('%H:%M:%S')}   {len(board.rows)} nodes")
    if board.status:
        header.append(f"   {board.status}", "bold yellow")
    summary = Text("  ")
    for i, (state, count) in enumerate(board.counts()):
        if i:
            summary.append("  ·  ")
        summary.append(f"{state} {count}", STATE_STYLE.get(state, ""))
    moving = [r for r in board.rows.values() if r.total]
    lines: list[RenderableType] = [header, summary]
    if moving:
        done = sum(min(r.bytes, r.total) for r in moving)
        total = sum(r.total for r in moving)
        rate = sum(r.rate(now) or 0.0 for r in moving)
        overall = Table.grid(padding=(0, 1))
        overall.add_row(
            Text("  all"),
            ProgressBar(total=total, completed=done, width=30),
            Text(f"{human_size(done)} of {human_size(total)}")
            + Text(f"  {human_size(rate)}/s" if rate else ""),
        )
        lines.append(overall)
    rows = board.ordered()
    if len(rows) > height - len(lines) - 3:
        lines.extend(node_map(board, width))
    table = Table(box=None, pad_edge=False, expand=True, show_edge=False, padding=(0, 1))
    table.add_column("node", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    bar_width = 16 if width >= 120 else 6  # a narrow terminal keeps room for the message
    table.add_column("progress", width=bar_width + 6, no_wrap=True)
    table.add_column("rate", justify="right", no_wrap=True)
    table.add_column("eta", justify="right", no_wrap=True)
    table.add_column("since", no_wrap=True)
    table.add_column("last message", ratio=1, no_wrap=True, overflow="ellipsis")
    room = max(1, height - len(lines) - 3)
    shown = rows if len(rows) <= room else rows[: room - 1]
    for row in shown:
        bar: RenderableType = Text("")
        if row.total:
            pct = min(100, int(100 * row.bytes / row.total))
            grid = Table.grid(padding=(0, 1))
            grid.add_row(
                ProgressBar(total=row.total, completed=row.bytes, width=bar_width), f"{pct:3d}%"
            )
            bar = grid
        node_rate = row.rate(now)
        message = row.message or ""
        if row.state == FAILED and row.reason:
            message = f"[{row.reason}] {message}"
        table.add_row(
            Text(row.node),
            Text(row.state, STATE_STYLE.get(row.state, "")),
            Text(row.phase or ""),
            bar,
            Text(f"{human_size(node_rate)}/s" if node_rate else ""),
            Text(_duration(row.eta(now))),
            Text(_since(row.since)),
            Text(message.replace("\n", " ")),
        )
    lines.append(table if rows else Text("  no nodes here: add them with corral node add or apply"))
    if len(shown) < len(rows):
        rest: dict[str, int] = {}
        for row in rows[len(shown) :]:
            rest[row.state] = rest.get(row.state, 0) + 1
        more = ", ".join(f"{state} {n}" for state, n in rest.items())
        lines.append(Text(f"  … and {len(rows) - len(shown)} more ({more})", "dim"))
    return Group(*lines)


#: A node in the map: its progress as the height of a block; a failure as a cross.
_LEVELS = " ▁▂▃▄▅▆▇█"


def node_map(board: Board, width: int) -> list[RenderableType]:
    """Every node as one cell, in name order, coloured by state, its height its progress:
    when the rows do not all fit, the whole cluster still shows at a glance."""
    cells = Text("  ")
    per_line = max(10, width - 4)
    for i, name in enumerate(sorted(board.rows)):
        row = board.rows[name]
        if i and i % per_line == 0:
            cells.append("\n  ")
        if row.state == FAILED:
            glyph = "✗"
        elif row.total:
            glyph = _LEVELS[1 + min(7, int(8 * row.bytes / row.total))]
        else:
            glyph = "█" if row.state in (INSTALLED, RUNNING) else "·"
        cells.append(glyph, STATE_STYLE.get(row.state, ""))
    first, last = min(board.rows), max(board.rows)
    legend = Text(f"  one cell per node, {first} to {last}: ✗ failed, height = progress", "dim")
    return [cells, legend]


# -- where the rows come from -----------------------------------------------------------


class Feed:
    """A source of snapshots and stream messages."""

    def snapshot(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        """The stream messages that arrived since the last call (none: polled feeds)."""
        return []

    def close(self) -> None:
        pass


class RemoteFeed(Feed):
    """``corral serve``'s REST API: the snapshot, then its event stream, read by a thread
    that reconnects (with ``Last-Event-ID``) when the stream drops."""

    def __init__(
        self, url: str, token: str, nodes: str | None = None, deployment: int | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.params: dict[str, Any] = {}
        if nodes:
            self.params["nodes"] = nodes
        if deployment is not None:
            self.params["deployment"] = deployment
        self.client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, read=60.0),
        )
        self.queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.down_since: float | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, name="corral-watch", daemon=True)

    def _get(self, path: str, **params: Any) -> Any:
        try:
            answer = self.client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise WatchError(
                f"cannot reach corral serve at {self.url}: {exc}",
                "start it (corral serve), or name it with --server URL or CORRAL_SERVER",
            ) from None
        if answer.status_code == 401:
            raise WatchError(
                f"corral serve at {self.url} refused the admin token",
                "give the token of that server: CORRAL_API_TOKEN or --token-file "
                "(it is in its $CORRAL_HOME/api-token)",
            )
        if answer.status_code >= 400:
            detail = answer.json().get("detail", answer.text) if answer.content else ""
            raise WatchError(f"corral serve at {self.url} answered {answer.status_code}: {detail}")
        return answer.json()

    def snapshot(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self._get("/api/v1/status", **self.params)["nodes"]
        if not self.thread.is_alive() and not self.stopping.is_set():
            self.thread.start()
        return nodes

    def deployment(self, ident: int) -> dict[str, Any]:
        data: dict[str, Any] = self._get(f"/api/v1/deployments/{ident}")
        return data

    def _read(self) -> None:
        params: dict[str, Any] = {}
        if "nodes" in self.params:
            params["node"] = self.params["nodes"]
        if "deployment" in self.params:
            params["deployment"] = self.params["deployment"]
        last_id: str | None = None
        pause = 0.5
        while not self.stopping.is_set():
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.client.stream(
                    "GET", "/api/v1/events/stream", params=params, headers=headers
                ) as stream:
                    stream.raise_for_status()
                    self.down_since, pause = None, 0.5
                    for kind, data, ident in _sse(stream.iter_lines()):
                        if ident:
                            last_id = ident
                        self.queue.put((kind, data))
                        if self.stopping.is_set():
                            return
            except httpx.HTTPError:
                pass
            if self.stopping.is_set():
                return
            self.down_since = self.down_since or time.monotonic()
            self.stopping.wait(pause)
            pause = min(5.0, pause * 2)

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        got = []
        while True:
            try:
                got.append(self.queue.get_nowait())
            except queue.Empty:
                return got

    def close(self) -> None:
        self.stopping.set()
        self.client.close()


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(event name, data, id) of each message of a Server-Sent Events stream."""
    kind, data, ident = "message", "", None
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads(data), ident
            kind, data, ident = "message", "", None
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line.startswith("id:"):
            ident = line[3:].strip()


class LocalFeed(Feed):
    """The database itself, read twice a second: for ``corral deploy --wait`` on the
    server's own machine, which needs no server address or token."""

    def __init__(self, deployment: int) -> None:
        self.ident = deployment

    def snapshot(self) -> list[dict[str, Any]]:
        from corral.cli.common import session
        from corral.serve.monitor import node_rows

        with session() as s:
            return node_rows(s, None, self.ident)


# -- the loop -----------------------------------------------------------------------------


def run_view(
    feed: Feed,
    title: str,
    console: Console,
    *,
    until: Callable[[], bool] | None = None,
    poll: float = 0.5,
) -> Board:
    """Show the board live until ``until()`` is true (checked after each refresh) or Ctrl-C;
    full screen on a terminal. Returns the last board."""
    board = Board()
    board.load(feed.snapshot())
    refreshed = time.monotonic()
    screen = console.is_terminal
    if until is not None and until():  # over before it was watched
        return board

    def view() -> RenderableType:
        size = console.size
        return render(board, title, size.height if screen else 40, size.width)

    with Live(view(), console=console, screen=screen, auto_refresh=False) as live:
        while True:
            for kind, data in feed.messages():
                if kind == "progress":
                    board.progress(data)
                elif kind == "event":
                    board.event(data)
            now = time.monotonic()
            polled = not isinstance(feed, RemoteFeed)
            if (board.stale or polled) and now - refreshed >= (poll if polled else REFRESH):
                board.load(feed.snapshot())
                board.stale, refreshed = False, now
                if until is not None and until():
                    live.update(view(), refresh=True)
                    break
            if isinstance(feed, RemoteFeed):
                down = feed.down_since
                board.status = "" if down is None else "reconnecting to corral serve…"
                if down is not None and now - down > GIVE_UP:
                    raise WatchError(
                        f"lost corral serve at {feed.url} for {GIVE_UP:.0f} s",
                        "is it still running? corral watch again once it is",
                    )
            live.update(view(), refresh=True)
            time.sleep(0.25)
    return board


def print_board(board: Board, title: str, console: Console) -> None:
    console.print(render(board, title, 10_000, console.size.width))


def _token(token_file: str | None) -> str:
    if token_file:
        try:
            return open(token_file).read().strip()
        except OSError as exc:
            raise WatchError(f"cannot read --token-file {token_file}: {exc.strerror}") from None
    if os.environ.get("CORRAL_API_TOKEN"):
        return os.environ["CORRAL_API_TOKEN"].strip()
    from corral.serve.assets import api_token

    config = settings()
    return config.api_token or api_token(config.home)


def default_server() -> str:
    """Where this machine's ``corral serve`` listens, as its settings say."""
    config = settings()
    address = config.address
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address
    return f"http://{host}:{config.http_port}"


def watch(
    nodes: str | None = typer.Argument(
        None, metavar="NODERANGE", help="the nodes, e.g. 'n[001-100]' [default: all]"
    ),
    deployment: int | None = typer.Option(
        None, "--deployment", "-d", metavar="ID", help="a deployment's nodes, until it ends"
    ),
    server: str | None = typer.Option(
        None,
        envvar="CORRAL_SERVER",
        help="corral serve's URL [default: this machine's, from its settings]",
    ),
    token_file: str | None = typer.Option(
        None,
        help="file holding the admin token [default: CORRAL_API_TOKEN, else "
        "$CORRAL_HOME/api-token]",
    ),
    once: bool = typer.Option(False, "--once", help="print the nodes once and exit"),
) -> None:
    """Watch nodes live, full screen: corral watch 'n[001-100]'  (Ctrl-C ends it)

    One row per node: state, phase, progress, rate, time left, since when, last message;
    failures first. Works against a remote corral serve (--server, CORRAL_API_TOKEN). With
    --deployment it ends with the deployment: exit 0 if every node is done, 1 if not.
    """
    if nodes and deployment is not None:
        raise WatchError("give a noderange or --deployment, not both")
    url = server or default_server()
    feed = RemoteFeed(url, _token(token_file), nodes, deployment)
    title = f"corral watch {nodes or ''}".rstrip()
    if deployment is not None:
        title = f"deployment {deployment}"
    try:
        if once:
            board = Board()
            board.load(feed.snapshot())
            print_board(board, title, out)
            return
        ended: dict[str, Any] = {}

        def finished() -> bool:
            if deployment is None:
                return False
            ended.update(feed.deployment(deployment))
            return str(ended.get("state")) != "running"

        try:
            run_view(feed, title, out, until=finished if deployment is not None else None)
        except KeyboardInterrupt:
            return
        if deployment is not None:
            state = ended.get("state")
            err.print(f"deployment {deployment} {state}", markup=False)
            raise typer.Exit(0 if state == "done" else 1)
    finally:
        feed.close()
