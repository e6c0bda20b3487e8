"""Deployments in the database: creating them (every check before anything is written),
following each node's progress, cancelling, and ending nodes that went silent.

A node takes part in at most one running deployment. Its row moves through the phases of
:data:`corral.agent.phases.DEPLOY_STEPS`; ``done``, ``failed`` and ``cancelled`` end it, and the
deployment ends when all of its nodes have.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.agent.phases import (
    CANCELLED,
    DEPLOY_STEPS,
    DEPLOYED,
    DONE,
    FAILED,
    FINAL,
    NODE_ERROR,
    REBOOTING,
    STARTING,
    TIMEOUT,
    WAITING,
)
from corral.agent.plan import Progress
from corral.deploy import diskless
from corral.deploy.auto import AUTO, choose
from corral.deploy.transports import names as transport_names
from corral.errors import NotFound, UsageError
from corral.images.store import ImageStore, ImageVersion
from corral.inventory import models as m
from corral.inventory.merge import Merged, merge_node
from corral.inventory.noderange import expand, fold
from corral.inventory.schema import NodeSpec
from corral.inventory.state import NodeStates
from corral.inventory.store import Inventory
from corral.render.renderer import Snapshot

RUNNING = "running"
#: The longest message or log tail kept per node.
MAX_TEXT = 4000
MAX_LOG = 16000
MB = 1 << 20


class DeployError(UsageError):
    """A deployment that cannot start as asked."""


@dataclass(frozen=True)
class Target:
    """What one node of a new deployment gets."""

    node: NodeSpec
    merged: Merged
    version: ImageVersion
    transport: str


def image_layers(version: ImageVersion) -> list[str]:
    """The layers an image version was built with (``build debian-12 +compute +gpu``)."""
    origin = str(version.manifest.get("origin", ""))
    return (
        [w[1:] for w in origin.split() if w.startswith("+")] if origin.startswith("build") else []
    )


def layout_mb(merged: Merged) -> tuple[int, bool]:
    """(MiB the layout's fixed partitions need, whether one grows to fill the disk)."""
    parts = merged.values["partitions"]
    return sum(p.size_mb for p in parts), any(p.grow for p in parts)


def disk_bytes(facts: dict[str, Any] | None, device: str) -> int | None:
    """The size of the install disk as the node reported it (discovery), if known."""
    disks = (facts or {}).get("disks") or []
    for disk in disks:
        name = str(disk.get("name", ""))
        if not device or device.rsplit("/", 1)[-1] == name:
            size = disk.get("size_bytes") or disk.get("size")
            return int(size) if size else None
    return None


def install_disk(node: NodeSpec, merged: Merged) -> str:
    return str(node.variables.get("disk") or merged.values["variables"].get("disk") or "") or (
        merged.values["disk"] or ""
    )


def _stream_size(version: ImageVersion) -> int:
    return int(version.manifest.get("exports", {}).get("stream", {}).get("size", 0))


class Deployments:
    def __init__(self, session: Session) -> None:
        self.session = session

    # -- creating ---------------------------------------------------------------------

    def plan_targets(
        self,
        noderange: str,
        images: ImageStore,
        image: str | None,
        transport: str,
        kind: str = "install",
    ) -> list[Target]:
        """Check everything a deployment needs and say who gets what; writes nothing."""
        squashfs = kind == diskless.DISKLESS
        known = [*(diskless.squashfs_transports() if squashfs else transport_names()), AUTO]
        if transport not in known:
            raise DeployError(f"unknown transport '{transport}'", f"use one of: {', '.join(known)}")
        names = expand(noderange)
        inventory = Inventory(self.session)
        missing = [n for n in names if not inventory.exists("node", n)]
        if missing:
            raise NotFound("node", fold(missing), "list nodes with 'corral node list'")
        busy = self.active_nodes(names)
        if busy:
            raise DeployError(
                f"{fold(sorted(busy))} already deploying (deployment "
                f"{', '.join(str(d) for d in sorted(set(busy.values())))})",
                "wait for it, or stop it with 'corral deployment cancel ID'",
            )
        snapshot = Snapshot(self.session)
        cache: dict[tuple[str, ...], Merged] = {}
        explicit = images.get_ref(image) if image else None
        states = NodeStates(self.session)
        targets: list[Target] = []
        for node in snapshot.nodes(names):
            merged = merge_node(node, snapshot.groups, snapshot.profiles, cache)
            if kind == diskless.DISKLESS:
                diskless.check_node(node)  # before its image: a node that is not diskless
            version = explicit or self._profile_image(node, merged, images)
            wanted = merged.values["layers"]
            if wanted and not explicit:
                lacking = [name for name in wanted if name not in image_layers(version)]
                if lacking:
                    raise DeployError(
                        f"node {node.name}: image {version.ref} was not built with layer "
                        f"{', '.join(lacking)}",
                        f"build it with 'corral image build {version.name} --distro D "
                        + " ".join(f"--layer {name}" for name in wanted)
                        + "'",
                    )
            if kind == diskless.DISKLESS:
                diskless.check_settings(node.name, diskless.settings_of(merged))
            else:
                self._check_disk(node, merged, version, states)
            targets.append(Target(node, merged, version, transport))
        return targets

    @staticmethod
    def _profile_image(node: NodeSpec, merged: Merged, images: ImageStore) -> ImageVersion:
        ref = merged.values["image"]
        if not ref:
            raise DeployError(
                f"node {node.name} has no image",
                "give one with --image NAME, or set it in a profile: "
                "'corral profile set P --image NAME'",
            )
        return images.get_ref(str(ref))

    def _check_disk(
        self, node: NodeSpec, merged: Merged, version: ImageVersion, states: NodeStates
    ) -> None:
        facts = states.status(node.name).facts
        size = disk_bytes(facts, install_disk(node, merged))
        if size is None:
            return  # unknown here: the agent checks before it writes anything
        fixed, _ = layout_mb(merged)
        need = fixed * MB + int(version.manifest.get("size_bytes", 0) * 1.1)
        if size < need:
            raise DeployError(
                f"node {node.name}: disk of {size // MB} MiB is too small for the layout "
                f"and image {version.ref} ({need // MB} MiB needed)",
                "choose a smaller layout in its profile or a bigger disk",
            )

    def create(
        self,
        noderange: str,
        image: str | None,
        targets: Sequence[Target],
        requested: str | None = None,
        kind: str = "install",
        sizes: dict[str, int] | None = None,
    ) -> int:
        """Store the deployment and arm its nodes (installs); returns its id. ``sizes``:
        bytes each image ref sends, when not its stream's (a diskless boot's squashfs)."""
        now = time.time()
        deployment = m.Deployment(
            created=now,
            finished=None,
            state=RUNNING,
            noderange=noderange,
            image=image,
            transport=requested or (targets[0].transport if targets else ""),
            kind=kind,
        )
        for t in targets:
            deployment.nodes.append(
                m.DeploymentNode(
                    node=t.node.name,
                    image=t.version.ref,
                    transport=t.transport,
                    phase=WAITING,
                    bytes=0,
                    total=(sizes or {}).get(t.version.ref) or _stream_size(t.version),
                    message="",
                    log_tail="",
                    powered=None,
                    started=None,
                    updated=now,
                    finished=None,
                )
            )
        self.session.add(deployment)
        self.session.flush()
        if kind == "install":
            NodeStates(self.session).arm([t.node.name for t in targets])
        return deployment.id

    # -- reading ----------------------------------------------------------------------

    def get(self, ident: int) -> m.Deployment:
        row = self.session.get(m.Deployment, ident)
        if row is None:
            raise NotFound("deployment", str(ident), "list them with 'corral deployment list'")
        return row

    def recent(self, limit: int = 50) -> list[m.Deployment]:
        query = select(m.Deployment).order_by(m.Deployment.id.desc()).limit(limit)
        return list(self.session.scalars(query))

    def running(self) -> list[m.Deployment]:
        query = select(m.Deployment).where(m.Deployment.state == RUNNING)
        return list(self.session.scalars(query.order_by(m.Deployment.id)))

    def running_count(self) -> int:
        query = select(func.count()).select_from(m.Deployment)
        return int(self.session.scalar(query.where(m.Deployment.state == RUNNING)) or 0)

    def active_nodes(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """node -> deployment id, for nodes in a running deployment that have not ended."""
        query = select(m.DeploymentNode.node, m.DeploymentNode.deployment_id).where(
            m.DeploymentNode.phase.not_in(FINAL)
        )
        if names is not None:
            query = query.where(m.DeploymentNode.node.in_(list(names)))
        return {node: dep for node, dep in self.session.execute(query)}

    def active(self, node: str) -> m.DeploymentNode | None:
        query = select(m.DeploymentNode).where(
            m.DeploymentNode.node == node, m.DeploymentNode.phase.not_in(FINAL)
        )
        return self.session.scalars(query.order_by(m.DeploymentNode.id.desc())).first()

    def member(self, ident: int, node: str) -> m.DeploymentNode:
        row = self.session.scalars(
            select(m.DeploymentNode).where(
                m.DeploymentNode.deployment_id == ident, m.DeploymentNode.node == node
            )
        ).first()
        if row is None:
            raise NotFound(f"node {node} in deployment", str(ident))
        return row

    # -- changing ---------------------------------------------------------------------

    def report(self, ident: int, node: str, progress: Progress, source: str) -> m.DeploymentNode:
        """Store a node's progress; a report after the node ended changes nothing."""
        if progress.phase not in DEPLOY_STEPS:
            raise UsageError(
                f"unknown phase '{progress.phase}'", f"use one of: {', '.join(DEPLOY_STEPS)}"
            )
        row = self.member(ident, node)
        if row.phase in FINAL:
            return row
        now = time.time()
        changed = progress.phase != row.phase
        row.phase = progress.phase
        row.bytes, row.total = max(0, progress.bytes), progress.total or row.total
        if progress.message or changed:
            row.message = progress.message[:MAX_TEXT]
        if progress.log_tail:
            row.log_tail = progress.log_tail[-MAX_LOG:]
        row.started = row.started or now
        row.updated = now
        if changed:
            states = NodeStates(self.session)
            if progress.phase == DONE and row.deployment.kind == diskless.DISKLESS:
                what = f"deployment {ident}: {row.image} in RAM; starting its systemd"
                states.record(node, STARTING, what, source)
            elif progress.phase == DONE:
                states.record(node, *_written(ident, row.image, progress), source)
            elif progress.phase == FAILED:
                states.record(
                    node,
                    FAILED,
                    f"deployment {ident}: {row.message}",
                    source,
                    reason=NODE_ERROR,
                    deployment=ident,
                    log=row.log_tail,
                )
            else:
                states.record(node, progress.phase, f"deployment {ident}", source, deployment=ident)
        if progress.phase in FINAL:
            row.finished = now
            self._maybe_finish(row.deployment)
        return row

    def fail(
        self, row: m.DeploymentNode, reason: str, phase: str = FAILED, *, why: str = TIMEOUT
    ) -> None:
        """End the node's part with ``reason`` (for people) and ``why`` (for machines:
        :data:`~corral.agent.phases.REASONS`)."""
        if row.phase in FINAL:
            return
        now = time.time()
        row.phase, row.message, row.updated, row.finished = phase, reason[:MAX_TEXT], now, now
        if Inventory(self.session).exists("node", row.node):  # it may have been removed
            NodeStates(self.session).record(
                row.node,
                FAILED,
                f"deployment {row.deployment_id}: {reason}",
                "corral",
                reason=CANCELLED if phase == CANCELLED else why,
                deployment=row.deployment_id,
                log=row.log_tail or None,
            )
        self._maybe_finish(row.deployment)

    def cancel(self, ident: int) -> int:
        """Stop a running deployment; returns how many nodes were still going."""
        deployment = self.get(ident)
        if deployment.state != RUNNING:
            raise DeployError(f"deployment {ident} has ended ({deployment.state})")
        going = [row for row in deployment.nodes if row.phase not in FINAL]
        for row in going:
            self.fail(row, "cancelled by the administrator", phase=CANCELLED)
        deployment.state = "cancelled"
        return len(going)

    def _maybe_finish(self, deployment: m.Deployment) -> None:
        if deployment.state != RUNNING:
            return
        # counted by the database (the session flushes first), not by loading every node
        # of the deployment: each node's final report did that, 1,000 rows a report at
        # 1,000 nodes (23 ms each)
        members = select(func.count()).where(m.DeploymentNode.deployment_id == deployment.id)
        if self.session.scalar(members.where(m.DeploymentNode.phase.not_in(FINAL))):
            return
        failed = self.session.scalar(members.where(m.DeploymentNode.phase != DONE))
        deployment.state = "failed" if failed else "done"
        deployment.finished = time.time()


def _written(ident: int, image: str, progress: Progress) -> tuple[str, str]:
    """(phase, message) of a node whose agent ended ``done``: its image is on its disk, and
    whether corral now waits for its installed system's first-boot call."""
    where = f"deployment {ident}: {image} is on its disk"
    if progress.first_boot and progress.reboot:
        return REBOOTING, f"{where}; rebooting into it"
    if progress.first_boot:
        return DEPLOYED, f"{where}; it reports when its installed system first boots"
    return DEPLOYED, f"{where} (no first-boot report: bootloader none, or no systemd)"


def new_deployment(
    session: Session,
    images: ImageStore,
    noderange: str,
    image: str | None,
    transport: str,
    kind: str = "install",
) -> int:
    """Check, make the export it sends if it is missing (once per version), store, arm.
    ``transport``: a name in the transports' registry, or ``auto``.

    Every install plan describes the image by its stream (chunk hashes, sizes), whatever
    the transport, so the stream is made even for rsync, which sends the tree. A diskless
    boot (``kind`` ``diskless``) sends the squashfs, and its nodes' RAM is checked for it.
    """
    from corral.images.exports import Chunked, build_exports

    store = Deployments(session)
    targets = store.plan_targets(noderange, images, image, transport, kind)
    if not targets:
        raise DeployError(f"no node in '{noderange}'")
    export = "squashfs" if kind == diskless.DISKLESS else "stream"
    versions = {t.version.ref: images.get_ref(t.version.ref) for t in targets}
    for version in versions.values():
        build_exports(version, which=[export])
    versions = {ref: images.get_ref(ref) for ref in versions}  # with the export's size
    sizes = {ref: int(Chunked(v, export).index()["size"]) for ref, v in versions.items()}
    if kind == diskless.DISKLESS:
        states = NodeStates(session)
        for t in targets:
            diskless.check_memory(
                t.node.name,
                states.status(t.node.name).facts,
                sizes[t.version.ref],
                diskless.settings_of(t.merged).overlay_size,
            )
    available = diskless.squashfs_transports() if kind == diskless.DISKLESS else transport_names()
    chosen: dict[str, str] = {}
    for ref in versions:
        count = sum(1 for t in targets if t.version.ref == ref)
        chosen[ref] = choose(count, sizes[ref], available) if transport == AUTO else transport
    return store.create(
        noderange,
        image,
        [Target(t.node, t.merged, versions[t.version.ref], chosen[t.version.ref]) for t in targets],
        requested=transport,
        kind=kind,
        sizes=sizes,
    )
