"""Diskless boots, as deployments of kind ``diskless``.

A diskless node installs nothing: at every network boot its agent gets a plan like an
install's (``mode`` ``diskless``), receives the image's *squashfs* export by the same
transports, mounts it in RAM under a tmpfs overlay, writes the node's identity into it and
starts the image's systemd. So a boot of many nodes is one deployment, and one transfer
session per image version, whether it is started by ``corral boot`` (which power-cycles
the nodes) or by nodes booting on their own: the first of those opens a deployment that
gathers, for ``diskless_window`` seconds, every node booting the same image version, and
only then starts its session (a node arriving later opens the next one).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.agent.phases import WAITING
from corral.agent.plan import Diskless
from corral.config import Settings
from corral.deploy.auto import AUTO, choose
from corral.deploy.transports import names as transport_names
from corral.errors import UsageError
from corral.images.exports import Chunked, build_exports
from corral.images.store import ImageStore, ImageVersion
from corral.inventory import models as m
from corral.inventory.merge import Merged, merge_node
from corral.inventory.noderange import fold
from corral.inventory.schema import InstallMethod, NodeSpec
from corral.inventory.state import NodeStates
from corral.render.renderer import Snapshot

log = logging.getLogger("corral.deploy")

DISKLESS = "diskless"
#: RAM a diskless node needs besides its image and overlay: kernel, page cache, systemd
RESERVE_MB = 384
#: Transports that can carry a squashfs (rsync sends trees)
_SIZE = re.compile(r"^(\d+)(%?)$")
MB = 1 << 20


class DisklessError(UsageError):
    """A diskless boot that cannot go as asked."""


def squashfs_transports() -> list[str]:
    return [name for name in transport_names() if name != "rsync"]


def settings_of(merged: Merged) -> Diskless:
    """The plan's ``diskless`` part, from the node's merged variables."""
    variables = merged.values["variables"]
    paths = variables.get("persistent_paths") or []
    if isinstance(paths, str):
        paths = paths.split()
    return Diskless(
        overlay_size=str(variables.get("overlay_size", Diskless.overlay_size)),
        persistent=[str(p) for p in paths],
        label=str(variables.get("persistent_label", Diskless.label)),
        device=str(variables.get("persistent_disk", "")),
        wipe=variables.get("wipe_disk") is True,
    )


def check_settings(node: str, diskless: Diskless) -> None:
    if not _SIZE.match(diskless.overlay_size):
        raise DisklessError(
            f"node {node}: overlay_size {diskless.overlay_size!r} is not a size",
            "give MiB (overlay_size: 2048) or a share of RAM (overlay_size: 25%)",
        )
    bad = [p for p in diskless.persistent if not p.startswith("/") or p == "/" or ".." in p]
    if bad:
        raise DisklessError(
            f"node {node}: persistent path {bad[0]!r} is not an absolute path below /",
            "list paths like /var/log or /scratch in persistent_paths",
        )


def overlay_bytes(size: str, memory_mb: int) -> int:
    """The overlay's tmpfs size in bytes for a node with ``memory_mb`` of RAM."""
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(size)
    value = int(match.group(1))
    return memory_mb * MB * value // 100 if match.group(2) else value * MB


def check_memory(node: str, facts: dict[str, Any] | None, squashfs: int, overlay: str) -> None:
    """Refuse a node whose RAM, as discovery found it, cannot hold the squashfs, the
    overlay and what the system itself needs; a node of unknown RAM is let through."""
    memory_mb = int((facts or {}).get("memory_mb") or 0)
    if not memory_mb:
        return
    tmpfs = overlay_bytes(overlay, memory_mb)
    need = squashfs + tmpfs + RESERVE_MB * MB
    if need > memory_mb * MB:
        raise DisklessError(
            f"node {node}: {memory_mb} MiB of RAM cannot hold the image's squashfs "
            f"({squashfs / MB:.0f} MiB), the overlay ({tmpfs / MB:.0f} MiB, overlay_size "
            f"{overlay}) and the system ({RESERVE_MB} MiB): {need / MB:.0f} MiB needed",
            "give it a smaller overlay_size or image, or boot it from its disk",
        )


def check_node(node: NodeSpec) -> None:
    if node.install_method is not InstallMethod.DISKLESS:
        raise DisklessError(
            f"node {node.name} installs by {node.install_method.value}, it is not diskless",
            f"make it diskless with 'corral node set {node.name} --install-method diskless'",
        )


def squashfs_of(images: ImageStore, version: ImageVersion) -> Chunked:
    """The version's squashfs export, made when it is missing (once per version)."""
    build_exports(version, which=["squashfs"])
    return Chunked(images.get_ref(version.ref), "squashfs")


def squashfs_size(payload: Chunked) -> int:
    return int(payload.index()["size"])


# -- nodes booting on their own ------------------------------------------------------------


def join_boot(
    session: Session, settings: Settings, images: ImageStore, name: str, client_ip: str
) -> m.DeploymentNode:
    """Put a diskless node that booted on its own (in no deployment) into the gathering
    deployment of its image version, opening one if none is gathering.

    Raises :class:`CorralError` when the node cannot boot: no image, an image version
    without a squashfs export, too little RAM.
    """
    states = NodeStates(session)
    snapshot = Snapshot(session)
    node = next(iter(snapshot.nodes([name])))
    merged = merge_node(node, snapshot.groups, snapshot.profiles)
    ref = merged.values["image"]
    if not ref:
        raise DisklessError(
            f"diskless node {name} has no image",
            "set one in its profile: 'corral profile set P --image NAME'",
        )
    version = images.get_ref(str(ref))
    payload = Chunked(version, "squashfs")
    diskless = settings_of(merged)
    check_settings(name, diskless)
    check_memory(name, states.status(name).facts, squashfs_size(payload), diskless.overlay_size)
    now = time.time()
    deployment = session.scalars(
        select(m.Deployment)
        .where(
            m.Deployment.kind == DISKLESS,
            m.Deployment.state == "running",
            m.Deployment.image == version.ref,
            m.Deployment.gather_until > now,
        )
        .order_by(m.Deployment.id.desc())
    ).first()
    if deployment is None:
        deployment = m.Deployment(
            created=now,
            finished=None,
            state="running",
            noderange=name,
            image=version.ref,
            transport=settings.diskless_transport,
            kind=DISKLESS,
            gather_until=now + max(0.0, settings.diskless_window),
        )
        session.add(deployment)
        log.info(
            "node %s boots %s diskless: gathering the nodes that boot it for %.0f s",
            name,
            version.ref,
            settings.diskless_window,
        )
    row = m.DeploymentNode(
        node=name,
        image=version.ref,
        transport=deployment.transport,
        phase=WAITING,
        bytes=0,
        total=squashfs_size(payload),
        message=f"booted on its own from {client_ip}",
        log_tail="",
        powered=now,  # it is up: nothing to power on
        started=None,
        updated=now,
        finished=None,
    )
    deployment.nodes.append(row)
    deployment.noderange = fold(sorted(r.node for r in deployment.nodes))
    session.flush()
    return row


def close_gathering(deployment: m.Deployment, sizes: dict[str, int]) -> None:
    """The window is over: pick ``auto``'s transport from the nodes gathered."""
    if deployment.transport != AUTO:
        return
    chosen = choose(
        len(deployment.nodes),
        sizes.get(deployment.image or "", 0),
        squashfs_transports(),
    )
    for row in deployment.nodes:
        row.transport = chosen
    log.info(
        "diskless deployment %d: %d node(s) gathered, transport %s",
        deployment.id,
        len(deployment.nodes),
        chosen,
    )
