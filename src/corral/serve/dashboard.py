"""The web dashboard: a read-only page that shows the nodes, the deployments and each
node's history, live.

The page is static files (``web/``: HTML, CSS and JavaScript modules, no build step).
Everything it shows comes from the admin API, which it calls with the admin token as the
``corral_token`` cookie that its login form sets: the browser's ``EventSource`` can send a
cookie, not a header. It loads a snapshot once (``/api/v1/status``,
``/api/v1/deployments``) and then applies the event stream; a node's detail is read when
it is opened and again when that node has a new event. No request per node per tick.

This module adds the page's routes (login, logout, its files, the state table it follows
nodes with) and the admin route of a node's detail.
"""

from __future__ import annotations

import hmac
import html
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Cookie, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.agent import phases
from corral.agent.phases import FINAL
from corral.inventory import models as m
from corral.inventory import state as st
from corral.inventory.state import NodeStates, next_state
from corral.inventory.store import Inventory
from corral.serve.events import event_out, iso
from corral.serve.monitor import EventOut

COOKIE = "corral_token"
WEB = Path(__file__).parent / "web"
#: The states in the order the page lists them: what needs a look first.
STATES = (
    st.FAILED,
    st.INSTALLING,
    st.BOOTING,
    st.DEPLOYED,
    st.ARMED,
    st.DISCOVERED,
    st.INSTALLED,
    st.RUNNING,
)
#: Events that set a state without a report of the node (NodeStates.arm, netboot, discover)
SET_BY = {"armed": st.ARMED, "netboot": st.BOOTING, "discovered": st.DISCOVERED}
#: Phases after which a node waits for nothing: they have no duration.
ENDS = (
    phases.INSTALL_FINISHED,
    phases.FIRST_BOOT,
    phases.RUNNING,
    phases.FAILED,
    phases.CANCELLED,
    "discovered",
)
#: Events that start a new boot or install of a node: its phase durations start there.
STARTS = ("armed", "netboot")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class PhaseSpan(BaseModel):
    phase: str
    start: str = Field(description="ISO 8601")
    seconds: float | None = Field(description="until the next event; None: a phase that ends")
    open: bool = Field(description="the node is in it now: seconds so far")


class DeploymentPart(BaseModel):
    id: int
    image: str
    transport: str
    phase: str
    bytes: int
    total: int


class NodeDetailOut(BaseModel):
    node: str
    state: str
    phase: str | None
    message: str | None
    since: str | None = Field(description="when it entered its phase (ISO 8601)")
    interfaces: list[dict[str, Any]] = Field(description="as the inventory has them")
    groups: list[str]
    profiles: list[str]
    facts: dict[str, Any] | None = Field(
        description="what discovery reported: cpus, memory_mb, disks, nics"
    )
    deployment: DeploymentPart | None = Field(description="its latest deployment")
    failure: EventOut | None = Field(description="its last failure: reason, phase, log tail")
    durations: list[PhaseSpan] = Field(description="its latest boot or install, phase by phase")
    events: list[EventOut] = Field(description="its newest events, oldest first")


def phase_durations(events: list[m.NodeEvent], now: float) -> list[dict[str, Any]]:
    """How long each phase of the node's latest boot or install lasted: from each event
    to the next, from its last ``armed`` or ``netboot`` on; the last one until ``now``
    unless it is a phase that ends (installed, running, failed...)."""
    start = max((i for i, e in enumerate(events) if e.phase in STARTS), default=0)
    run = events[start:]
    spans = []
    for index, this in enumerate(run):
        after = run[index + 1] if index + 1 < len(run) else None
        ends = this.phase in ENDS
        if after is not None:
            seconds: float | None = None if ends else max(0.0, after.time - this.time)
        else:
            seconds = None if ends else max(0.0, now - this.time)
        spans.append(
            {
                "phase": this.phase,
                "start": iso(this.time),
                "seconds": seconds,
                "open": after is None and not ends,
            }
        )
    return spans


def node_detail(session: Session, name: str, limit: int) -> dict[str, Any]:
    states = NodeStates(session)
    status = states.status(name)  # NotFound (404) for an unknown node
    spec = Inventory(session).node(name)
    events = states.events(name, limit)
    failure = session.scalars(
        select(m.NodeEvent)
        .where(m.NodeEvent.node == name, m.NodeEvent.phase == phases.FAILED)
        .order_by(m.NodeEvent.id.desc())
        .limit(1)
    ).first()
    part = session.scalars(
        select(m.DeploymentNode)
        .where(m.DeploymentNode.node == name)
        .order_by(m.DeploymentNode.deployment_id.desc())
        .limit(1)
    ).first()
    return {
        "node": name,
        "state": status.state,
        "phase": status.phase,
        "message": status.message,
        "since": iso(status.updated) if status.updated else None,
        "interfaces": [
            i.model_dump(mode="json", include={"name", "mac", "ip", "vlan"})
            for i in spec.interfaces
        ],
        "groups": list(spec.groups),
        "profiles": [str(p) for p in spec.profiles],
        "facts": status.facts,
        "deployment": None
        if part is None
        else {
            "id": part.deployment_id,
            "image": part.image,
            "transport": part.transport,
            "phase": part.phase,
            "bytes": part.bytes,
            "total": part.total,
        },
        "failure": event_out(failure) if failure is not None else None,
        "durations": phase_durations(events, time.time()),
        "events": [event_out(e) for e in events],
    }


def lifecycle() -> dict[str, Any]:
    """What the page needs to follow nodes from their events alone, as
    :func:`~corral.inventory.state.next_state` decides it."""
    return {
        "states": list(STATES),
        "next": {s: {p: next_state(s, p) for p in phases.LIFE_CYCLE} for s in STATES},
        "set_by": SET_BY,
        "boot_steps": list(phases.BOOT_STEPS),
        "final": list(FINAL),
    }


def detail_routes(
    router: APIRouter, session: Callable[[], AbstractContextManager[Session]]
) -> None:
    """Add the node detail the dashboard opens to the admin ``router`` (admin token)."""

    @router.get("/nodes/{name}/detail", response_model=NodeDetailOut, tags=["monitoring"])
    def detail(
        name: str,
        events: Annotated[int, Query(ge=1, le=5000, description="newest events")] = 200,
    ) -> Any:
        """A node as the dashboard's detail shows it: its state, inventory, hardware facts
        from discovery, its last failure with the log tail, how long each phase of its
        latest boot or install took, and its newest events."""
        with session() as s:
            return node_detail(s, name, events)


def _same(presented: str | None, api_token: str) -> bool:
    return hmac.compare_digest((presented or "").encode(), api_token.encode())


def _login_page(wrong: bool) -> HTMLResponse:
    problem = (
        '<p class="login-error" role="alert">That is not the admin token.</p>' if wrong else ""
    )
    page = (WEB / "login.html").read_text().replace("<!--problem-->", problem)
    return HTMLResponse(page, status_code=401, headers=SECURITY_HEADERS)


def dashboard_router(api_token: str) -> APIRouter:
    """The page, its login and its files; not part of the API's schema."""
    router = APIRouter(prefix="/dashboard", include_in_schema=False)
    files = {p.name: p for p in WEB.iterdir() if p.suffix in (".js", ".css", ".svg")}
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

    @router.get("")
    def page(corral_token: Annotated[str | None, Cookie()] = None) -> Response:
        if not _same(corral_token, api_token):
            return _login_page(wrong=False)
        return FileResponse(WEB / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        if not _same(token, api_token):
            return _login_page(wrong=True)
        done = RedirectResponse("/dashboard", status_code=303)
        done.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",  # the API's routes read it too
        )
        return done

    @router.post("/logout")
    def logout() -> Response:
        done = RedirectResponse("/dashboard", status_code=303)
        done.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return done

    @router.get("/lifecycle.json")
    def states(corral_token: Annotated[str | None, Cookie()] = None) -> Response:
        if not _same(corral_token, api_token):
            return JSONResponse({"detail": "log in at /dashboard"}, status_code=401)
        return JSONResponse(lifecycle())

    @router.get("/{name}")
    def asset(name: str) -> Response:
        path = files.get(name)
        if path is None:
            return Response(html.escape(f"no file {name}"), status_code=404)
        fresh = {"Cache-Control": "no-cache"}  # a new corral's files, not the old ones
        return FileResponse(path, media_type=types[path.suffix], headers=fresh)

    return router
