"""HTTP routes of deployments: what agents call (plan, progress, image chunks, all with
the node's token) and the admin API (create, list, show, cancel, with the API token)."""

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from corral.agent.phases import CANCELLED, DEPLOY_STEPS
from corral.deploy.service import DeployService
from corral.deploy.store import Deployments, new_deployment
from corral.deploy.transports.base import Meter, RateBudget
from corral.deploy.view import DeploymentOut, deployment_out

#: The longest a plan request may wait for the node's plan (``?wait=``); agents ask for
#: less than their HTTP timeout.
PLAN_WAIT_MAX = 60.0
#: A waiting plan request asks again at least this often, rung or not.
PLAN_RECHECK = 5.0


class ProgressIn(BaseModel):
    phase: str = Field(description=f"one of: {', '.join((*DEPLOY_STEPS, CANCELLED))}")
    bytes: int = 0
    total: int = 0
    message: str = ""
    log_tail: str = ""
    first_boot: bool = Field(False, description="with done: the installed system will report")
    reboot: bool = Field(False, description="with done: the agent reboots into it now")
    joined: str = Field(
        "",
        description="the tag of the transfer session the node's receiver has just joined "
        "(multicast): a session starts once its nodes are in",
    )


class DeploymentIn(BaseModel):
    nodes: str = Field(description="noderange, e.g. n[001-100]")
    image: str | None = Field(None, description="NAME or NAME:VERSION; default: profiles'")
    transport: str = "http"
    kind: Literal["install", "diskless"] = Field(
        "install", description="install the image on disks, or boot diskless nodes into it"
    )


class MeteredFile(FileResponse):
    """A chunk file whose body bytes are counted in ``meter`` under ``ref`` once the
    response ends: a Range request counts its part, a client that left what it got.
    With a ``budget``, each piece waits its turn in it (multicast's catch-ups)."""

    def __init__(
        self, path: Path, meter: Meter, ref: str, budget: RateBudget | None = None
    ) -> None:
        super().__init__(path, media_type="application/octet-stream")
        self.meter, self.ref, self.budget = meter, ref, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0

        async def counted(message: Message) -> None:
            nonlocal sent
            if self.budget is not None and message["type"] == "http.response.body":
                wait = self.budget.reserve(len(message.get("body", b"")))
                if wait > 0:
                    await asyncio.sleep(wait)
            await send(message)
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.pathsend":  # the server sends the file
                sent += Path(self.path).stat().st_size

        try:
            await super().__call__(scope, receive, counted)
        finally:
            self.meter.add(self.ref, sent)


def agent_router(
    deploy: DeployService,
    client: Callable[[Request], str],
    bearer: Callable[[str | None], str | None],
) -> APIRouter:
    router = APIRouter(tags=["deployment (nodes)"])

    @router.get("/api/v1/nodes/{name}/plan")
    async def plan(
        name: str,
        request: Request,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=PLAN_WAIT_MAX,
                description="seconds to hold the request while the node has no plan yet, "
                "answering as soon as it has one",
            ),
        ] = 0,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The node's install plan (204: nothing to do yet); needs the node's token.

        With ``wait``, a node that has no plan yet (a chain still gathering its nodes, a
        session not started) gets it the moment it has one, not on its next poll."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        token, address = bearer(authorization), client(request)
        while True:
            rings = deploy.plans.rings
            data = await run_in_threadpool(deploy.plan, name, token, address)
            if data is not None:
                return Response(json.dumps(data), media_type="application/json")
            left = deadline - loop.time()
            if left <= 0:
                return Response(status_code=204)
            # rung when a plan may be ready; asked again anyway after a while, for what
            # only time makes ready (a chain forms ``chain_max_wait`` after its first node)
            await deploy.plans.wait(rings, min(left, PLAN_RECHECK))

    @router.post("/api/v1/deployments/{ident}/nodes/{name}/progress")
    async def progress(
        ident: int,
        name: str,
        body: ProgressIn,
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """A node's progress; the answer says whether to stop (cancelled)."""
        args = (ident, name, bearer(authorization), body.model_dump(), client(request))
        # most reports only move a bar: taken in memory, on the event loop
        quick = deploy.quick_progress(*args)
        if quick is not None:
            return quick
        # the others wait for the group commit without holding a thread of the pool
        future, answer = deploy.progress_begin(*args)
        return answer(await asyncio.wrap_future(future))

    @router.get("/images/{name}/{version}/chunks/{index}.bin")
    def chunk(
        name: str,
        version: int,
        index: str,
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """One chunk of an image's stream (Range requests supported), for the nodes that
        are installing that image."""
        path, budget = deploy.chunk(name, version, index, bearer(authorization), client(request))
        return MeteredFile(path, deploy.served, f"{name}:{version}", budget)

    @router.get("/images/{name}/{version}/squashfs/chunks/{index}.bin")
    def squashfs_chunk(
        name: str,
        version: int,
        index: str,
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """One chunk of an image's squashfs (Range requests supported), for the diskless
        nodes that are booting that image."""
        path = deploy.chunk_path(
            name, version, index, bearer(authorization), client(request), export="squashfs"
        )
        return MeteredFile(path, deploy.served, f"{name}:{version}/squashfs")

    return router


def admin_routes(router: APIRouter, deploy: DeployService) -> None:
    def session() -> Iterator[Session]:
        with deploy.session() as s:
            yield s

    Db = Annotated[Session, Depends(session)]

    @router.get("/deployments", response_model=list[DeploymentOut], tags=["deployments"])
    def list_deployments(db: Db) -> Any:
        return [deployment_out(d) for d in Deployments(db).recent()]

    @router.get("/deployments/{ident}", response_model=DeploymentOut, tags=["deployments"])
    def show_deployment(ident: int, db: Db) -> Any:
        return deployment_out(Deployments(db).get(ident))

    @router.post(
        "/deployments", response_model=DeploymentOut, status_code=201, tags=["deployments"]
    )
    def create_deployment(body: DeploymentIn, db: Db) -> Any:
        """Deploy an image to nodes, or boot diskless nodes into theirs (``kind``
        ``diskless``, as ``corral boot``); returns at once, the manager does the rest."""
        ident = new_deployment(
            db, deploy.images, body.nodes, body.image, body.transport, kind=body.kind
        )
        return deployment_out(Deployments(db).get(ident))

    @router.post("/deployments/{ident}/cancel", response_model=DeploymentOut, tags=["deployments"])
    def cancel_deployment(ident: int, db: Db) -> Any:
        Deployments(db).cancel(ident)
        deploy.forget(ident)
        return deployment_out(Deployments(db).get(ident))
