"""A deployment as its users see it: the one shape that ``corral deployment show``
prints, the REST API answers and a dashboard shows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from corral.inventory import models as m


class DeploymentNodeOut(BaseModel):
    node: str
    image: str
    transport: str
    phase: str
    bytes: int
    total: int
    message: str
    started: float | None
    updated: float
    finished: float | None


class DeploymentOut(BaseModel):
    id: int
    state: str
    noderange: str
    image: str | None
    transport: str
    kind: str = Field("install", description="install, or diskless (a boot into RAM)")
    created: float
    finished: float | None
    nodes: list[DeploymentNodeOut]


def deployment_out(row: m.Deployment) -> dict[str, Any]:
    """The deployment with its nodes, as :class:`DeploymentOut` describes it."""
    return {
        "id": row.id,
        "state": row.state,
        "noderange": row.noderange,
        "image": row.image,
        "transport": row.transport,
        "kind": row.kind,
        "created": row.created,
        "finished": row.finished,
        "nodes": [
            {
                k: getattr(n, k)
                for k in DeploymentNodeOut.model_fields  # the same fields, by name
            }
            for n in row.nodes
        ],
    }
