"""What happens to nodes, as it happens: the hub that ``corral serve`` publishes every node
event and progress report to, once, and that every live view reads.

Change-driven, not polled: a node event is published when the transaction that stored it
commits (whatever stored it: a node's report, the deployment manager, a boot step); a
progress report when the deployment service took it. Each message is encoded once, into a
ring of the newest :data:`RING` messages. A client of the stream (the dashboard, ``corral
watch``, another tool) holds only a cursor into that ring: a wake-up of the event loop
hands each client everything past its cursor in one write, so ten viewers cost ten writes
per wake-up, not a query per node per viewer. A client that falls a whole ring behind (it
stopped reading) is dropped; it may come back with ``Last-Event-ID`` and get the stored
events it missed from the database.

Events that other processes store (``corral node reinstall`` from the CLI) reach the hub
through :class:`Tail`, which reads the event table once a second and publishes the rows the
server did not publish itself. It also deletes the events older than
``event_retention_days``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, event, func, select
from sqlalchemy.orm import Session

from corral.bell import Bell
from corral.inventory import models as m

log = logging.getLogger("corral.serve")

#: Messages the hub keeps for its clients: at 1,000 nodes reporting every 2 s, a minute.
RING = 50_000
#: Seconds between the comments that keep an idle stream (and its proxies) open.
KEEPALIVE = 15.0
#: Seconds a client may take to accept a write before it is dropped as not reading.
SEND_TIMEOUT = 10.0
#: Seconds between two reads of the event table for other processes' events.
TAIL_SECONDS = 1.0
#: Seconds between two deletions of expired events.
PRUNE_SECONDS = 3600.0


def iso(timestamp: float) -> str:
    """A Unix time as ISO 8601 in local time with its offset, to the millisecond."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def event_out(row: m.NodeEvent) -> dict[str, Any]:
    """A stored event as the API, the stream, ``corral watch`` and the dashboard show it."""
    return {
        "id": row.id,
        "time": iso(row.time),
        "node": row.node or None,
        "mac": row.mac,
        "phase": row.phase,
        "message": row.message,
        "source": row.source,
        "deployment": row.deployment,
        "reason": row.reason,
        "during": row.during,
        "log": row.log,
    }


@dataclass(frozen=True)
class Message:
    """One message of the stream, encoded once for every client."""

    seq: int
    kind: str  # "event" (stored, with an id) or "progress"
    node: str | None
    deployment: int | None
    event_id: int | None
    data: bytes  # the SSE frame


def frame(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """An SSE frame; only stored events carry an ``id:``, so that a client's
    ``Last-Event-ID`` is always one the database can resume from."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Hub:
    """The one place node events and progress go through, from any thread."""

    def __init__(self, capacity: int = RING) -> None:
        self._lock = threading.Lock()
        self._ring: deque[Message] = deque(maxlen=capacity)
        self._seq = 0
        #: rung once a message is in the ring (its rings are not the messages' numbers)
        self._bell = Bell()
        #: ids of the stored events published by this process, for :class:`Tail`
        self.published: set[int] = set()
        #: what each message kind is passed to besides the stream (metrics)
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        #: the clients of the stream now (counted on the event loop, read by the metrics)
        self.clients = 0

    @property
    def seq(self) -> int:
        return self._seq

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the clients on ``loop`` (the server's): called once it runs."""
        self._bell.bind(loop)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        event_id = data.get("id") if kind == "event" else None
        payload = frame(kind, data, event_id)
        for listener in self.listeners:
            try:
                listener(kind, data)
            except Exception:
                log.exception("event listener failed on a %s message", kind)
        with self._lock:
            self._seq += 1
            self._ring.append(
                Message(
                    self._seq, kind, data.get("node"), data.get("deployment"), event_id, payload
                )
            )
            if event_id is not None:
                if len(self.published) > RING:  # no Tail reads them (a test's app)
                    self.published.clear()
                self.published.add(event_id)
        self._bell.ring()

    def event(self, row: m.NodeEvent) -> None:
        self.publish("event", event_out(row))

    def progress(self, data: dict[str, Any]) -> None:
        self.publish("progress", data | {"time": iso(time.time())})

    def after(self, cursor: int) -> tuple[list[Message], bool]:
        """The messages past ``cursor``, and whether some were lost (the client fell more
        than the ring behind)."""
        with self._lock:
            if not self._ring or self._ring[-1].seq <= cursor:
                return [], False
            first = self._ring[0].seq
            lost = first > cursor + 1
            start = max(0, cursor + 1 - first)
            return [self._ring[i] for i in range(start, len(self._ring))], lost

    async def wait(self, cursor: int, timeout: float) -> None:
        """Until there is a message past ``cursor``, or ``timeout`` seconds."""
        rings = self._bell.rings
        if self._seq > cursor:
            return
        await self._bell.wait(rings, timeout)


# -- stored events: published when their transaction commits -----------------------------

_hubs: list[Hub] = []


def _collect(session: Session, _context: Any) -> None:
    # after a flush, ``session.new`` still lists what it inserted, now with their ids
    # (taken as data now: after the commit, an expired row could not be read)
    rows = sorted((o for o in session.new if isinstance(o, m.NodeEvent)), key=lambda o: o.id)
    new = [event_out(row) for row in rows]
    if new:
        session.info.setdefault("corral_events", []).extend(new)


def _publish(session: Session) -> None:
    events = session.info.pop("corral_events", None)
    if events:
        for hub in _hubs:
            for data in events:
                hub.publish("event", data)


def _forget(session: Session) -> None:
    session.info.pop("corral_events", None)


def attach(hub: Hub) -> None:
    """Publish to ``hub`` every node event any session of this process commits."""
    if not _hubs:
        event.listen(Session, "after_flush", _collect)
        event.listen(Session, "after_commit", _publish)
        event.listen(Session, "after_rollback", _forget)
    _hubs.append(hub)


def detach(hub: Hub) -> None:
    if hub in _hubs:
        _hubs.remove(hub)
    if not _hubs:
        event.remove(Session, "after_flush", _collect)
        event.remove(Session, "after_commit", _publish)
        event.remove(Session, "after_rollback", _forget)


# -- reading stored events -----------------------------------------------------------------


def stored_events(
    session: Session,
    *,
    after: int | None = None,
    since: float | None = None,
    nodes: list[str] | None = None,
    deployment: int | None = None,
    limit: int = 1000,
    newest: int | None = None,
) -> list[m.NodeEvent]:
    """Stored events, oldest first: past event ``after`` or from time ``since``, of
    ``nodes`` (None: all; "": unknown machines) or ``deployment``; the first ``limit``, or
    the ``newest`` ones."""
    if newest is not None:
        query = select(m.NodeEvent).order_by(m.NodeEvent.id.desc()).limit(newest)
    else:
        query = select(m.NodeEvent).order_by(m.NodeEvent.id).limit(limit)
    if after is not None:
        query = query.where(m.NodeEvent.id > after)
    if since is not None:
        query = query.where(m.NodeEvent.time >= since)
    if nodes is not None:
        query = query.where(m.NodeEvent.node.in_(nodes))
    if deployment is not None:
        query = query.where(m.NodeEvent.deployment == deployment)
    rows = list(session.scalars(query))
    return rows[::-1] if newest is not None else rows


def last_event_id(session: Session) -> int:
    return int(session.scalar(select(func.max(m.NodeEvent.id))) or 0)


class Tail(threading.Thread):
    """Publishes the events other processes stored, and deletes expired ones."""

    def __init__(
        self,
        hub: Hub,
        session: Callable[[], AbstractContextManager[Session]],
        retention_days: float,
    ) -> None:
        super().__init__(name="corral-events", daemon=True)
        self.hub = hub
        self.session = session
        self.retention = retention_days * 86400
        self.stopping = threading.Event()
        self.cursor: int | None = None  # the newest event when it started: read first
        self._pruned = 0.0

    def tick(self) -> None:
        with self.session() as s:
            if self.cursor is None:
                self.cursor = last_event_id(s)
            rows = stored_events(s, after=self.cursor, limit=5000)
            for row in rows:
                self.cursor = max(self.cursor, row.id)
                if row.id in self.hub.published:
                    self.hub.published.discard(row.id)
                else:
                    self.hub.event(row)
            now = time.time()
            if self.retention > 0 and now - self._pruned > PRUNE_SECONDS:
                self._pruned = now
                result = s.execute(
                    delete(m.NodeEvent).where(m.NodeEvent.time < now - self.retention)
                )
                gone = getattr(result, "rowcount", 0)
                if gone:
                    log.info(
                        "deleted %d events older than the retention's %.0f days",
                        gone,
                        self.retention / 86400,
                    )

    def run(self) -> None:
        while not self.stopping.wait(TAIL_SECONDS):
            try:
                self.tick()
            except Exception:
                log.exception("reading the event table failed; retrying")

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
