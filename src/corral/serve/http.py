"""corral's HTTP face: boot files for nodes, their reports, and the admin REST API.

Routes only parse and answer; the work is done by :class:`BootService` (nodes) and
:class:`~corral.inventory.store.Inventory` (admin), the same code the CLI calls.
"""

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Cookie, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from corral import __version__
from corral.agent.phases import BOOT_CONFIG, INITRD, NODE_REPORTS
from corral.config import Settings
from corral.deploy.service import DeployService
from corral.errors import (
    CorralError,
)
from corral.inventory.bootfiles import imported
from corral.inventory.noderange import expand
from corral.inventory.schema import (
    DistroSpec,
    GroupSpec,
    Mac,
    NodeSpec,
    ProfileSpec,
    Spec,
    normalize_mac,
)
from corral.inventory.state import NodeStates
from corral.inventory.store import Inventory, Kind
from corral.render.check import checked_change
from corral.serve.boot import BootService
from corral.serve.dashboard import dashboard_router, detail_routes
from corral.serve.deployments import admin_routes, agent_router
from corral.serve.events import Hub, attach, detach
from corral.serve.limits import MAX_BODY, BodyLimit
from corral.serve.metrics import Metrics
from corral.serve.monitor import monitor_routes
from corral.serve.steps import Step, boot_file_phase

log = logging.getLogger("corral.serve")
TEXT = "text/plain; charset=utf-8"


class Event(BaseModel):
    phase: str = Field(description=f"one of: {', '.join(NODE_REPORTS)}")
    message: str = ""


class Facts(BaseModel):
    """What the discovery ramdisk reports: anyone may send it, so it is bounded."""

    mac: Mac
    cpus: int | None = Field(None, ge=0, le=1 << 20)
    memory_mb: int | None = Field(None, ge=0, le=1 << 40)
    disks: list[dict[str, Any]] = Field([], max_length=256)
    nics: list[dict[str, Any]] = Field([], max_length=256)


class PowerIn(BaseModel):
    nodes: str = Field(description="the nodes, a noderange: n[001-100]")
    action: Literal["on", "off", "cycle", "status"]
    netboot: bool = Field(False, description="before on or cycle, boot from the network once")


class PowerOut(BaseModel):
    node: str
    driver: str
    ok: bool
    state: str | None = Field(description="on or off, as the BMC told; null: unknown")
    reason: str | None = Field(description="why it failed, or what a person must do (manual)")
    why: str | None = Field(description="timeout, unreachable, auth, bmc-error, config, manual")
    seconds: float


class NodeStatusOut(BaseModel):
    name: str
    state: str
    phase: str | None
    message: str | None
    updated: float | None


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def create_app(
    service: BootService,
    api_token: str,
    deploy: DeployService | None = None,
    hub: Hub | None = None,
) -> FastAPI:
    hub = hub or Hub()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        hub.bind(asyncio.get_running_loop())
        try:
            yield
        finally:
            detach(hub)

    app = FastAPI(
        title="corral",
        version=__version__,
        description="Boot files for nodes, their reports, the inventory's admin API, and "
        "the nodes' events, live.",
        lifespan=lifespan,
    )
    app.state.hub = hub
    attach(hub)  # every node event committed from now on goes to the live views

    @app.exception_handler(CorralError)
    def _corral_error(request: Request, exc: CorralError) -> JSONResponse:
        if exc.http_status == 422:  # a report or request corral could not take: say so
            log.warning(
                "refused %s %s from %s: %s",
                request.method,
                request.url.path,
                _client(request),
                exc.message,
            )
        return JSONResponse({"detail": exc.message, "hint": exc.hint}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        log.warning(
            "refused %s %s from %s: malformed (%s: %s)",
            request.method,
            request.url.path,
            _client(request),
            where,
            first.get("msg", "?"),
        )
        return await request_validation_exception_handler(request, exc)

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY)
    deploy = deploy or DeployService(service.settings, service.session, service.authorize)
    deploy.on_progress = hub.progress
    app.include_router(_boot_router(service))
    app.include_router(_node_router(service))
    app.include_router(agent_router(deploy, _client, _bearer))
    admin = _admin_router(service, api_token)
    admin_routes(admin, deploy)
    monitor_routes(admin, hub, service.session)
    detail_routes(admin, service.session)
    app.include_router(admin, prefix="/api/v1")
    app.state.metrics = metrics = Metrics(hub, service.session, deploy)
    app.include_router(_metrics_router(metrics, api_token))
    app.include_router(dashboard_router(api_token))
    return app


@contextmanager
def _step(
    service: BootService, request: Request, phase: str | None, what: str, mac: str | None = None
) -> Iterator[None]:
    """Record the boot step a route serves, when the request comes (or that it failed, and
    why); recording never fails the request (:meth:`BootSteps.record` logs instead)."""
    if phase is None:
        yield
        return
    client = _client(request)
    try:
        yield
    except Exception as exc:
        if isinstance(exc, HTTPException):
            why = str(exc.detail)
        else:
            why = exc.message if isinstance(exc, CorralError) else "internal error"
        service.steps.record(Step(phase, f"{what} over HTTP failed: {why}", client, mac))
        raise
    service.steps.record(Step(phase, f"{what} over HTTP", client, mac))


def _mac_or_none(text: str) -> str | None:
    try:
        return normalize_mac(text.replace("-", ":"))
    except ValueError:
        return None


def _boot_router(service: BootService) -> APIRouter:
    router = APIRouter(tags=["boot"])

    @router.get("/boot/ipxe", response_class=PlainTextResponse)
    def ipxe_entry(request: Request) -> Response:
        """The script DHCP hands iPXE clients: chains to the one for their MAC."""
        with _step(service, request, BOOT_CONFIG, "iPXE entry script"):
            return PlainTextResponse(service.ipxe_entry())

    @router.get("/boot/{mac}.ipxe", response_class=PlainTextResponse)
    def ipxe_script(mac: str, request: Request) -> Response:
        """The node's iPXE script, rendered live (a discovery script for unknown MACs)."""
        with _step(service, request, BOOT_CONFIG, "iPXE script", _mac_or_none(mac)):
            return PlainTextResponse(service.ipxe_for_mac(mac.replace("-", ":")))

    @router.get("/boot/token/{name}.cpio.gz")
    def token(name: str, request: Request) -> Response:
        """The node's install token as an initrd; only to the node's own address."""
        with _step(service, request, INITRD, "token"):
            cpio = service.token_cpio(name, _client(request))
        return Response(cpio, media_type="application/octet-stream")

    @router.get("/ks/{name}", response_class=PlainTextResponse)
    def kickstart(name: str, request: Request) -> Response:
        """The node's kickstart with a fresh token; only to its own address while armed."""
        with _step(service, request, BOOT_CONFIG, "kickstart"):
            return PlainTextResponse(service.kickstart(name, _client(request)))

    @router.get("/scripts/{name}/{kind}", response_class=PlainTextResponse)
    def script(
        name: str,
        kind: str,
        request: Request,
        token: Annotated[str | None, Query()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The node's pre- or post-install script; needs its token."""
        if kind not in ("pre", "post"):
            raise HTTPException(404, f"no script '{kind}': use pre or post")
        text = service.script(name, kind, token or _bearer(authorization), _client(request))
        return PlainTextResponse(text)

    @router.get("/distros/{distro}/{name}")
    def distro_file(distro: str, name: str, request: Request) -> Response:
        """A distro's kernel or initrd (Range requests supported)."""
        with _step(service, request, boot_file_phase(f"distros/{distro}/{name}"), name):
            path = service.distro_file(distro, name)
            if path is None:
                raise HTTPException(404, f"distro {distro} has no local file {name}")
        return FileResponse(path)

    @router.get("/corral/ramdisk/{name}")
    def ramdisk_file(name: str, request: Request) -> Response:
        """The deploy and discovery ramdisk (Range requests supported)."""
        with _step(service, request, boot_file_phase(f"corral/ramdisk/{name}"), name):
            path = service.ramdisk_file(name)
            if path is None:
                raise HTTPException(404, f"no ramdisk file {name}: run 'corral ramdisk build'")
        return FileResponse(path)

    @router.get("/corral/diskless/{node}/{name}")
    def diskless_file(node: str, name: str, request: Request) -> Response:
        """A diskless node's kernel (its image's) or initrd (the deploy ramdisk with that
        kernel's modules); 404 with the reason when the node cannot have them."""
        with _step(service, request, boot_file_phase(f"corral/diskless/{node}/{name}"), name):
            path = service.diskless_file(node, name)
            if path is None:
                raise HTTPException(404, f"no diskless boot file {name}: use vmlinuz or initrd.img")
        return FileResponse(path)

    return router


def _node_router(service: BootService) -> APIRouter:
    """What nodes call: their reports (token) and discovery (unknown machines)."""
    router = APIRouter(prefix="/api/v1", tags=["nodes report"])

    @router.post("/nodes/{name}/events")
    def event(
        name: str,
        body: Event,
        request: Request,
        token: Annotated[str | None, Query()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """A node reports a phase of its install; needs the node's token."""
        return service.event(
            name, token or _bearer(authorization), body.phase, body.message, _client(request)
        )

    @router.post("/discover")
    def discover(body: Facts, request: Request) -> dict[str, str]:
        """An unknown machine reports itself; it is registered as a discovered node."""
        return {"node": service.discover(body.model_dump(), _client(request))}

    return router


def _admin_guard(api_token: str) -> Callable[..., None]:
    """The dependency of every admin route: the API token, or 401."""

    def require_admin(
        authorization: Annotated[str | None, Header()] = None,
        corral_token: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    ) -> None:
        # the dashboard's browser sends the token as a cookie: EventSource sets no header
        presented = _bearer(authorization) or corral_token or ""
        if not hmac.compare_digest(presented.encode(), api_token.encode()):
            log.warning(
                "refused admin API request: %s bearer token", "wrong" if presented else "missing"
            )
            raise HTTPException(401, "admin API needs 'Authorization: Bearer <api token>'")

    return require_admin


def _metrics_router(metrics: Metrics, api_token: str) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_admin_guard(api_token))], tags=["monitoring"])

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}, "application/openmetrics-text": {}}}},
    )
    def prometheus(accept: Annotated[str | None, Header()] = None) -> Response:
        """Prometheus metrics (docs/metrics.md): nodes by state, phase durations, image
        bytes sent, boot requests, failures by reason. Needs the admin token: Prometheus
        sends it with ``authorization: {credentials: ...}`` in its scrape config."""
        body, content_type = metrics.exposition(accept)
        return Response(body, headers={"content-type": content_type})

    return router


def _admin_router(service: BootService, api_token: str) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_admin_guard(api_token))], tags=["admin"])

    def session() -> Iterator[Session]:
        with service.session() as s:
            yield s

    Db = Annotated[Session, Depends(session)]
    specs: dict[Kind, type[Spec]] = {
        "distro": DistroSpec,
        "profile": ProfileSpec,
        "group": GroupSpec,
        "node": NodeSpec,
    }
    for kind, model in specs.items():
        _crud(router, kind, model, Db, service.settings)

    @router.get("/nodes/{name}/status", response_model=NodeStatusOut)
    def status(name: str, db: Db) -> Any:
        return NodeStates(db).status(name)

    @router.post("/power", response_model=list[PowerOut])
    def power(body: PowerIn) -> Any:
        """Power nodes on, off, cycle them or read their power state through their BMCs,
        power_pool at once, each within power_timeout; one answer per node, failures
        with their reason. On, off and cycle are events in the nodes' history."""
        from corral.deploy.power import power_nodes

        names = expand(body.nodes)
        with service.session() as s:
            Inventory(s).specs("node", names)  # an unknown node: 404, before any BMC
        outcomes = power_nodes(
            service.settings, service.session, names, body.action, netboot=body.netboot
        )
        return [asdict(o) for o in outcomes]

    @router.post("/nodes/{name}/reinstall", response_model=NodeStatusOut)
    def reinstall(name: str, db: Db) -> Any:
        """Re-arm the node: its next network boot installs it."""
        states = NodeStates(db)
        states.arm([name])
        return states.status(name)

    return router


def _crud(router: APIRouter, kind: Kind, model: type[Spec], db: Any, settings: Settings) -> None:
    plural = f"/{kind}s"
    home = settings.home

    def list_(session: Any) -> list[Any]:
        return [s.model_dump(mode="json") for s in Inventory(session).specs(kind)]

    def get(name: str, session: Any) -> Any:
        return Inventory(session).get(kind, name).model_dump(mode="json")

    def files(name: str, changes: dict[str, Any]) -> AbstractContextManager[dict[str, str]]:
        """A distro's local kernel and initrd are imported into corral's tree."""
        return imported(home, name, changes) if kind == "distro" else nullcontext({})

    def create(body: Any, session: Any) -> Any:
        inv = Inventory(session)
        with files(body.name, body.model_dump()) as stored:
            inv.add(kind, [body.model_copy(update=stored)])
        return inv.get(kind, body.name).model_dump(mode="json")

    def update(name: str, body: dict[str, Any], session: Any) -> Any:
        inv = Inventory(session)
        inv.get(kind, name)  # an unknown one is refused before any file is looked at
        # the nodes it affects are rendered with the change, as `corral ... set` does
        affected = [name] if kind == "node" else name
        checked = (
            nullcontext()
            if kind == "distro"
            else checked_change(settings, inv, kind, affected, f"{kind} {name}")
        )
        with checked, files(name, body) as stored:
            inv.edit(kind, [name], body | stored)  # variables merge, as `set --var`
        return inv.get(kind, name).model_dump(mode="json")

    def delete(name: str, session: Any) -> Response:
        Inventory(session).remove(kind, [name])
        return Response(status_code=204)

    # FastAPI reads parameter types from annotations: give these the real ones.
    for fn in (list_, get, create, update, delete):
        fn.__annotations__["session"] = db
    create.__annotations__["body"] = model
    endpoints: list[tuple[str, str, Callable[..., Any], int]] = [
        ("GET", plural, list_, 200),
        ("GET", plural + "/{name}", get, 200),
        ("POST", plural, create, 201),
        ("PATCH", plural + "/{name}", update, 200),
        ("DELETE", plural + "/{name}", delete, 204),
    ]
    for method, path, fn, code in endpoints:
        verb = fn.__name__.strip("_")
        router.add_api_route(
            path,
            fn,
            methods=[method],
            status_code=code,
            name=f"{verb}_{kind}",
            tags=[f"{kind}s"],
            summary=f"{verb} {kind}",
        )
