"""The monitoring API: the nodes' event history, their live stream (Server-Sent Events),
and the snapshot a live view starts from. ``corral watch``, the dashboard and other tools
all read these, with the admin token."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from corral.agent.phases import FAILED, FINAL
from corral.errors import InvalidValue
from corral.inventory import models as m
from corral.inventory.noderange import expand
from corral.inventory.state import NodeStates
from corral.serve.events import KEEPALIVE, SEND_TIMEOUT, Hub, Message, event_out, frame, iso
from corral.serve.events import stored_events as read_events

log = logging.getLogger("corral.serve")
MAX_LIMIT = 10_000
#: The most written to a client at once: what a client that stopped reading leaves
#: buffered in the server is about this and the socket's buffer.
WRITE = 64 * 1024
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class EventOut(BaseModel):
    id: int
    time: str = Field(description="ISO 8601, local time with its offset")
    node: str | None = Field(description="None: an unknown machine (see mac)")
    mac: str | None
    phase: str
    message: str
    source: str = Field(description="who recorded it: an address, corral, dhcp, tftp, http")
    deployment: int | None
    reason: str | None = Field(description="a failure's reason, for machines")
    during: str | None = Field(description="the phase a failure ended")
    log: str | None = Field(description="a failure's last lines of the node's log")


class NodeRow(BaseModel):
    """One node as a live view shows it."""

    node: str
    state: str
    phase: str | None
    message: str | None
    since: str | None = Field(description="when it entered its phase (ISO 8601)")
    deployment: int | None
    bytes: int
    total: int
    reason: str | None = Field(description="why it failed, when it did")


class StatusOut(BaseModel):
    time: str
    nodes: list[NodeRow]


def parse_since(text: str | None) -> float | None:
    """``since`` as a Unix time: ISO 8601 (``2026-12-03T12:00``) or an age (``90s``,
    ``15m``, ``2h``, ``7d``)."""
    if not text:
        return None
    relative = _RELATIVE.match(text.strip())
    if relative:
        return time.time() - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidValue(
            f"bad since '{text}'", "give a time (2026-12-03T12:00:00) or an age (15m, 2h, 7d)"
        ) from None
    return (parsed if parsed.tzinfo else parsed.astimezone()).timestamp()


def _names(noderange: str | None) -> list[str] | None:
    return expand(noderange) if noderange else None


def node_rows(
    session: Session, names: list[str] | None, deployment: int | None = None
) -> list[dict[str, Any]]:
    """The nodes (or a deployment's) as a live view shows them, with their progress in
    the deployment they are in (the given one, else their running one)."""
    members = select(m.DeploymentNode)
    if deployment is not None:
        members = members.where(m.DeploymentNode.deployment_id == deployment)
        found = list(session.scalars(members))
        if not found:
            raise InvalidValue(f"deployment {deployment} has no nodes (or does not exist)")
        names = sorted({r.node for r in found})
    else:
        members = members.where(m.DeploymentNode.phase.not_in(FINAL))
        if names is not None:
            members = members.where(m.DeploymentNode.node.in_(names))
        found = list(session.scalars(members))
    progress = {r.node: r for r in sorted(found, key=lambda r: r.deployment_id)}
    statuses = NodeStates(session).statuses(names)
    failed = [s.name for s in statuses if s.state == FAILED]
    reasons: dict[str, str | None] = {}
    if failed:
        query = (
            select(m.NodeEvent.node, m.NodeEvent.reason)
            .where(m.NodeEvent.node.in_(failed), m.NodeEvent.phase == FAILED)
            .order_by(m.NodeEvent.id)
        )
        reasons = {node: why for node, why in session.execute(query)}
    rows = []
    for status in statuses:
        member = progress.get(status.name)
        rows.append(
            {
                "node": status.name,
                "state": status.state,
                "phase": status.phase,
                "message": status.message,
                "since": iso(status.updated) if status.updated else None,
                "deployment": member.deployment_id if member else None,
                "bytes": member.bytes if member else 0,
                "total": member.total if member else 0,
                "reason": reasons.get(status.name),
            }
        )
    return rows


class EventStream(Response):
    """An SSE response that writes what the hub has past the client's cursor, drops a
    client that stops reading, and ends when the client goes."""

    media_type = "text/event-stream"

    def __init__(
        self,
        hub: Hub,
        backlog: list[bytes],
        wanted: Callable[[Message], bool],
        skip_through: int,
    ) -> None:
        self.hub = hub
        self.backlog = backlog
        self.wanted = wanted
        self.skip_through = skip_through  # stored events the backlog held already
        self.cursor = hub.seq
        self.status_code = 200
        self.background = None

    def _take(self) -> tuple[bytes, bool]:
        messages, lost = self.hub.after(self.cursor)
        if messages:
            self.cursor = messages[-1].seq
        body = b"".join(
            msg.data
            for msg in messages
            if self.wanted(msg) and (msg.event_id is None or msg.event_id > self.skip_through)
        )
        return body, lost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.ensure_future(listen())
        client = scope.get("client") or ("?", 0)
        self.hub.clients += 1
        try:
            body = b"retry: 2000\n\n" + b"".join(self.backlog)
            while not gone.is_set():
                if body:
                    try:
                        for start in range(0, len(body), WRITE):  # bounded buffers per client
                            piece = body[start : start + WRITE]
                            await asyncio.wait_for(
                                send(
                                    {"type": "http.response.body", "body": piece, "more_body": True}
                                ),
                                SEND_TIMEOUT,
                            )
                    except TimeoutError:
                        log.warning(
                            "event stream of %s dropped: it read nothing for %.0f s",
                            client[0],
                            SEND_TIMEOUT,
                        )
                        return
                body, lost = self._take()
                if lost:
                    log.warning(
                        "event stream of %s dropped: it fell behind by more than the "
                        "server keeps (it may reconnect with Last-Event-ID)",
                        client[0],
                    )
                    return
                if not body:
                    waiter = asyncio.ensure_future(self.hub.wait(self.cursor, KEEPALIVE))
                    await asyncio.wait({waiter, listener}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    body, lost = self._take()
                    if lost:
                        return
                    if not body and not gone.is_set():
                        body = b": keep-alive\n\n"
        except OSError:
            pass
        finally:
            self.hub.clients -= 1
            listener.cancel()
            if not gone.is_set():
                # end the response; a client dropped for not reading gets its socket closed
                with suppress(TimeoutError, OSError):
                    await asyncio.wait_for(
                        send({"type": "http.response.body", "body": b"", "more_body": False}),
                        1.0,
                    )


def monitor_routes(
    router: APIRouter, hub: Hub, session: Callable[[], AbstractContextManager[Session]]
) -> None:
    """Add the monitoring routes to the admin ``router`` (admin token)."""

    @router.get("/events", response_model=list[EventOut], tags=["monitoring"])
    def events(
        since: Annotated[
            str | None, Query(description="a time (ISO 8601) or an age: 90s, 15m, 2h, 7d")
        ] = None,
        after: Annotated[int | None, Query(description="only events past this id")] = None,
        node: Annotated[str | None, Query(description="noderange, e.g. n[001-100]")] = None,
        deployment: int | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
    ) -> Any:
        """The nodes' event history, oldest first: boot steps corral served, their
        reports, failures with their reasons. Page with ``after`` (the last id seen)."""
        start = parse_since(since)
        with session() as s:
            rows = read_events(
                s,
                after=after,
                since=start,
                nodes=_names(node),
                deployment=deployment,
                limit=limit,
            )
            return [event_out(r) for r in rows]

    @router.get(
        "/events/stream",
        tags=["monitoring"],
        response_class=Response,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-Sent Events: `event: event` (a stored event, as "
                "GET /events gives it, with its id as the SSE id) and `event: progress` "
                "(a node's progress in a deployment: node, deployment, phase, bytes, total, "
                "time).",
            }
        },
    )
    async def stream(
        request: Request,
        node: Annotated[str | None, Query(description="noderange")] = None,
        deployment: int | None = None,
        progress: Annotated[bool, Query(description="include progress reports")] = True,
        after: Annotated[int | None, Query(description="replay stored events past it")] = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The nodes' events and progress, live. A client that reconnects with
        ``Last-Event-ID`` (browsers do) first gets the stored events it missed."""
        names = set(_names(node) or ()) or None

        def wanted(msg: Message) -> bool:
            if msg.kind == "progress" and not progress:
                return False
            if names is not None and msg.node not in names:
                return False
            return deployment is None or msg.deployment == deployment

        resume = after
        if last_event_id and last_event_id.strip().isdigit():
            resume = int(last_event_id)
        backlog: list[bytes] = []
        skip = 0
        stream = EventStream(hub, [], wanted, 0)  # its cursor: before the backlog's query
        if resume is not None:

            def replay() -> list[m.NodeEvent]:
                with session() as s:
                    return read_events(
                        s,
                        after=resume,
                        nodes=sorted(names) if names else None,
                        deployment=deployment,
                        limit=MAX_LIMIT,
                    )

            rows = await asyncio.to_thread(replay)
            backlog = [frame("event", event_out(r), r.id) for r in rows]
            skip = rows[-1].id if rows else resume
        stream.backlog, stream.skip_through = backlog, skip
        return stream

    @router.get("/status", response_model=StatusOut, tags=["monitoring"])
    def status(
        nodes: Annotated[str | None, Query(description="noderange; default: all")] = None,
        deployment: Annotated[int | None, Query(description="a deployment's nodes")] = None,
    ) -> Any:
        """Every node (or a noderange, or a deployment's) as a live view starts: state,
        phase, since when, progress in its deployment, and why it failed."""
        with session() as s:
            return {"time": iso(time.time()), "nodes": node_rows(s, _names(nodes), deployment)}
