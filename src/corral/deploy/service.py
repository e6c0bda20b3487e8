"""The deployment side of ``corral serve``: plans for nodes, their progress reports, access
to image chunks, and a manager thread that starts, watches and ends deployments.

Everything a deployment is lives in the database, so a restarted server picks up where the
last one stopped: the manager prepares the transports of running deployments again, and
nodes, which retry their reports, carry on; a node that stays silent longer than
``deploy_node_timeout`` is failed with that reason, without holding up the others. Only
time the server was listening counts as silence: when 100 testbed nodes finished at once,
their disks' writeback held the server for 9 s, and a node whose report had been queued
behind it was failed though it ended done seconds later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from corral.agent import phases
from corral.agent.diskless import machine_id
from corral.agent.phases import (
    BOOT_STEPS,
    FAILED,
    FINAL,
    NO_IMAGE,
    POWER,
    REFUSED,
    REMOVED,
    SILENT,
    TIMEOUT,
    WAITING,
)
from corral.agent.plan import (
    Chunk,
    Disk,
    Identity,
    ImageInfo,
    Interface,
    Partition,
    Plan,
    Progress,
    TransportInfo,
)
from corral.bell import Bell
from corral.config import Settings
from corral.deploy.diskless import (
    DISKLESS,
    DisklessError,
    close_gathering,
    join_boot,
    settings_of,
)
from corral.deploy.keys import host_keys
from corral.deploy.power import NO_DRIVER, node_bmcs
from corral.deploy.power import describe as describe_power
from corral.deploy.store import RUNNING, Deployments, install_disk
from corral.deploy.transports import Transports
from corral.deploy.transports.base import Joinable, Member, Meter, NotReady, Paced, RateBudget
from corral.errors import CorralError, NotFound
from corral.images.catalog import image_store
from corral.images.exports import Chunked
from corral.images.store import ImageVersion
from corral.inventory import models as m
from corral.inventory.batch import GroupCommit
from corral.inventory.merge import merge_node
from corral.inventory.schema import RACK, InstallMethod
from corral.inventory.state import BOOTING, NodeStates
from corral.inventory.store import Inventory
from corral.power import Bmc, PowerContext, power
from corral.render.renderer import Renderer, Snapshot
from corral.vault import Vault

log = logging.getLogger("corral.deploy")
TICK = 1.0
#: Progress reports the server aims to take per second, and the longest interval it asks.
REPORTS_PER_SECOND = 20
REPORT_MAX = 5.0
#: The most a tick counts towards a node's silence, however late it runs.
MAX_STEP = 2 * TICK


#: Seconds a node's token and address, checked by a full report, let its next reports
#: of the same phase be taken in memory (:meth:`DeployService.quick_progress`).
STEADY_TTL = 30.0


@dataclass(frozen=True)
class _Steady:
    token_hash: str
    ip: str
    phase: str
    checked: float


def _digest(token: str | None) -> str:
    return hashlib.sha256((token or "").encode()).hexdigest()


def default_layout(version: ImageVersion) -> list[Partition]:
    """One ext4 root filling the disk, at least the image's size and a fifth to spare."""
    need = int(version.manifest.get("size_bytes", 0) * 1.2) >> 20
    return [Partition(mount="/", fstype="ext4", size_mb=max(64, need), grow=True)]


class DeployService:
    def __init__(
        self,
        settings: Settings,
        session: Callable[[], AbstractContextManager[Session]],
        authorize: Callable[[Session, str, str | None, str], None],
    ) -> None:
        self.settings = settings
        self.session = session
        self.authorize = authorize
        self.images = image_store(settings.home)
        self.transports = Transports(settings)
        self._versions: dict[str, ImageVersion] = {}
        #: node -> seconds it has been silent while this server was listening (memory
        #: only: after a restart, all start again from 0). A tick adds the time since the
        #: last one, but at most MAX_STEP, so a stall of the server's own (its host's disk
        #: or CPU held requests and manager alike) is not held against nodes whose reports
        #: could not get through meanwhile
        self.silent: dict[str, float] = {}
        self._ticked = 0.0
        #: (deployment, image, transport) of the transfer sessions started
        self._sessions: set[tuple[int, str, str]] = set()
        #: rung when nodes told "no plan yet" may have one now: a session started, or a
        #: node of a session others wait in got its plan (a chain that formed). The plan
        #: route's waiting requests (``?wait=``) ask again then, not seconds later.
        self.plans = Bell()
        #: the sessions some node was told "not ready" in, since one of them got a plan
        self._held: set[tuple[int, str, str]] = set()
        #: the nodes whose reports :meth:`quick_progress` may take, as their last full
        #: report left them; and the numbers it took, not written yet
        self._steady: dict[tuple[int, str], _Steady] = {}
        self._pending: dict[tuple[int, str], tuple[int, int, float, str]] = {}
        self._steady_lock = threading.Lock()
        self._gathering_lock = threading.Lock()
        #: the full reports' writes, many to a transaction
        self.writer = GroupCommit(session)
        #: what a progress report is passed to once stored (the live views' hub)
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        #: the image bytes the HTTP chunk routes sent, per export (for /metrics)
        self.served = Meter()

    def version(self, ref: str) -> ImageVersion:
        if ref not in self._versions:
            self._versions[ref] = self.images.get_ref(ref)
        return self._versions[ref]

    # -- what nodes ask -----------------------------------------------------------------

    def payload(self, row: m.DeploymentNode) -> Chunked:
        """What the node's deployment sends it: its image's stream, or squashfs (diskless)."""
        export = "squashfs" if row.deployment.kind == DISKLESS else "stream"
        return Chunked(self.version(row.image), export)

    def plan(self, node: str, token: str | None, client_ip: str) -> dict[str, Any] | None:
        """The node's install (or diskless boot) plan, or None when it has none yet: in no
        running deployment, or in a diskless one still gathering its nodes."""
        try:
            return self._plan(node, token, client_ip)
        except CorralError as exc:
            if not isinstance(exc, DisklessError):
                raise
            # the node cannot boot: its status says why (the plan's transaction is gone)
            with self.session() as s:
                NodeStates(s).record(
                    node, FAILED, f"diskless boot: {exc.message}", "corral", reason=REFUSED
                )
            log.error("node %s: diskless boot: %s", node, exc.message)
            raise

    def _plan(self, node: str, token: str | None, client_ip: str) -> dict[str, Any] | None:
        with self.session() as s:
            self.authorize(s, node, token, client_ip)
            row = Deployments(s).active(node)
            joins = row is None and Inventory(s).node(node).install_method is InstallMethod.DISKLESS
            if not joins:
                return self._plan_of(s, node, row, client_ip)
        # a diskless node that booted on its own: it joins in a transaction of its own
        self._join_boot(node, client_ip)
        with self.session() as s:
            return self._plan_of(s, node, Deployments(s).active(node), client_ip)

    def _plan_of(
        self, s: Session, node: str, row: m.DeploymentNode | None, client_ip: str
    ) -> dict[str, Any] | None:
        """The plan of ``node``, in deployment node ``row`` (None: in no deployment)."""
        if row is None:
            self._no_deployment(s, node, client_ip)
            return None
        if (
            row.deployment.gather_until is not None
            and (row.deployment_id, row.image, row.transport) not in self._sessions
        ):
            return None  # gathering nodes: their session starts when the window closes
        payload = self.payload(row)
        transport = self.transports.get(row.transport)
        transport.prepare(payload)
        key = (row.deployment_id, row.image, row.transport)
        try:
            params = transport.params(payload, node)
        except NotReady as exc:
            self.silent[node] = 0.0  # it asked: it is alive, and waits
            self._held.add(key)
            log.debug("node %s: no plan yet: %s", node, exc.message)
            return None
        if key in self._held:  # what held them may have let go of the others too
            self._held.discard(key)
            self.plans.ring()
        first = row.host_keys_given is None
        plan = self._build_plan(s, row, payload, params, with_host_keys=first)
        if first:
            row.host_keys_given = time.time()
        else:
            # The private keys go out once per deployment node: a second fetch is a
            # rebooted agent (whose node then makes new keys) or someone else.
            log.warning(
                "node %s fetched its plan again (deployment %d, from %s): without its "
                "SSH host keys, which went out with the first plan",
                node,
                row.deployment_id,
                client_ip,
            )
        self.silent[node] = 0.0
        log.info("node %s fetched its plan (deployment %d)", node, row.deployment_id)
        return plan.to_dict()

    def _join_boot(self, node: str, client_ip: str) -> None:
        """Put a diskless node that booted on its own into its gathering deployment, one
        node at a time: SQLite's driver begins a transaction at its first write, so two
        nodes arriving together would each read "none gathering" and open one apiece."""
        with self._gathering_lock, self.session() as s:
            if Deployments(s).active(node) is not None:
                return  # it joined on a request of its own a moment ago
            try:
                join_boot(s, self.settings, self.images, node, client_ip)
            except CorralError as exc:
                raise DisklessError(exc.message, exc.hint) from None

    @staticmethod
    def _no_deployment(session: Session, node: str, client_ip: str) -> None:
        """Say on the node's status, once, that it booted the deploy ramdisk for nothing."""
        states = NodeStates(session)
        if states.status(node).phase == WAITING:
            return
        message = (
            "booted the deploy ramdisk, but no deployment includes it: its agent asks for "
            f"one every few seconds for 10 minutes ('corral deploy {node}')"
        )
        states.record(node, WAITING, message, client_ip)
        log.warning("node %s: %s", node, message)

    def _build_plan(
        self,
        session: Session,
        row: m.DeploymentNode,
        payload: Chunked,
        params: dict[str, Any],
        *,
        with_host_keys: bool = True,
    ) -> Plan:
        snapshot = Snapshot(session)
        node = next(iter(snapshot.nodes([row.node])))
        merged = merge_node(node, snapshot.groups, snapshot.profiles)
        values = merged.values
        version = payload.image
        stream = payload.index()
        diskless = payload.export == "squashfs"
        host = host_keys(self.settings.home, node.name)
        size = int(stream["chunk_size"])
        chunks = [
            Chunk(sha256=h, size=min(size, stream["size"] - i * size))
            for i, h in enumerate(stream["chunks"])
        ]
        partitions = [
            Partition(mount=p.mount, fstype=p.fstype, size_mb=p.size_mb, grow=p.grow)
            for p in values["partitions"]
        ] or default_layout(version)
        variables = values["variables"]
        keys = variables.get("ssh_authorized_keys") or []
        post = Renderer(self.settings, snapshot).render_one(node, "post") if values["post"] else ""
        return Plan(
            deployment=row.deployment_id,
            node=row.node,
            image=ImageInfo(
                ref=version.ref,
                stream_sha256=stream["sha256"],
                stream_size=stream["size"],
                chunk_size=stream["chunk_size"],
                chunks=chunks,
                # nothing is unpacked on a diskless node
                tree_bytes=0 if diskless else int(version.manifest.get("size_bytes", 0)),
                files=int(version.manifest.get("file_count", 0)),
            ),
            transport=TransportInfo(name=row.transport, params=params),
            disk=Disk(
                device=install_disk(node, merged),
                label=str(variables.get("disk_label", "gpt")),
                partitions=partitions,
                wipe=variables.get("wipe_disk") is True,
            ),
            identity=Identity(
                hostname=node.name,
                interfaces=[
                    Interface(name=i.name, mac=i.mac, ip=i.ip, netmask=i.netmask, gateway=i.gateway)
                    for i in node.interfaces
                ],
                ssh_host_keys=host if with_host_keys else {},
                authorized_keys=[str(k) for k in (keys if isinstance(keys, list) else [keys])],
                root_password_hash=values["root_password_hash"],
                machine_id=(
                    machine_id(node.name, host.get("ssh_host_ed25519_key.pub", ""))
                    if diskless
                    else ""
                ),
            ),
            bootloader=str(variables.get("bootloader", "grub")),
            post_script=post,
            report_interval=report_interval(len(row.deployment.nodes)),
            kernel_args=_words(variables.get("installed_kernel_args")),
            mode="diskless" if diskless else "install",
            diskless=settings_of(merged) if diskless else None,
        )

    def progress(
        self, deployment: int, node: str, token: str | None, body: dict[str, Any], client_ip: str
    ) -> dict[str, Any]:
        """Store a node's progress report; the answer tells it whether to stop."""
        future, answer = self.progress_begin(deployment, node, token, body, client_ip)
        return answer(future.result())

    def progress_begin(
        self, deployment: int, node: str, token: str | None, body: dict[str, Any], client_ip: str
    ) -> tuple[Future[Any], Callable[[Any], dict[str, Any]]]:
        """The report's write, queued for the next group commit, and what makes the
        answer once it committed (an event loop awaits the one and calls the other)."""
        progress = Progress(
            phase=str(body.get("phase", "")),
            bytes=int(body.get("bytes", 0)),
            total=int(body.get("total", 0)),
            message=str(body.get("message", "")),
            log_tail=str(body.get("log_tail", "")),
            first_boot=body.get("first_boot") is True,
            reboot=body.get("reboot") is True,
        )
        joined = str(body.get("joined") or "")
        key = (deployment, node)
        with self._steady_lock:
            self._pending.pop(key, None)  # this report is newer than any not yet written

        def store(s: Session) -> tuple[str | None, dict[str, Any]]:
            self.authorize(s, node, token, client_ip)
            deployments = Deployments(s)
            member = deployments.member(deployment, node)
            before = member.phase
            if joined:  # its session may start now: not worth waiting for the commit
                self.joined(deployment, node, member.transport, joined)
            row = deployments.report(deployment, node, progress, client_ip)
            said = {"node": node, "deployment": deployment, "phase": row.phase}
            return before, said | {"bytes": row.bytes, "total": row.total}

        def answer(stored: tuple[str | None, dict[str, Any]]) -> dict[str, Any]:
            before, said = stored
            self.silent[node] = 0.0
            with self._steady_lock:
                if said["phase"] in FINAL:
                    self._steady.pop(key, None)
                else:
                    checked = _Steady(_digest(token), client_ip, said["phase"], time.time())
                    self._steady[key] = checked
            if said["phase"] != before:
                message = f" ({progress.message})" if progress.message else ""
                log.info("node %s: %s%s", node, said["phase"], message)
            if self.on_progress is not None:  # committed: the live views may show it
                self.on_progress(said)
            return {"cancel": said["phase"] == "cancelled", "phase": said["phase"]}

        return self.writer.submit(store), answer

    def joined(self, deployment: int, node: str, transport: str, tag: str) -> None:
        """The node's receiver joined its transfer session ``tag``: tell the transport,
        whose session may wait for its nodes to be in (multicast)."""
        found = self.transports.get(transport)
        if not (isinstance(found, Joinable) and found.joined(deployment, node, tag)):
            log.warning(
                "node %s says it joined session %s, which deployment %d does not run",
                node,
                tag,
                deployment,
            )

    def quick_progress(
        self, deployment: int, node: str, token: str | None, body: dict[str, Any], client_ip: str
    ) -> dict[str, Any] | None:
        """Take a report that only moves a node's bytes, in memory, and publish it at once;
        None when the report needs :meth:`progress` (a new phase, a message, a node not
        checked within :data:`STEADY_TTL`).

        Why: at 1,000 nodes, 200 reports a second each cost a transaction, a thread and
        two token queries (5 ms of CPU, most of the server's one core of Python), and
        queued reports took seconds to reach the live views. Such a report changes
        nothing but the numbers of the node's deployment row: the node's token and address
        were checked by its last full report, at most STEADY_TTL ago (so a token revoked
        meanwhile still moves a bar for that long, and nothing else), and the deployment
        manager writes the numbers once a second, in one transaction (:meth:`flush`)."""
        phase = body.get("phase")
        if any(body.get(k) for k in ("message", "log_tail", "first_boot", "reboot", "joined")):
            return None
        key = (deployment, node)
        now = time.time()
        with self._steady_lock:
            known = self._steady.get(key)
            if (
                known is None
                or known.phase != phase
                or known.ip != client_ip
                or now - known.checked > STEADY_TTL
                or not hmac.compare_digest(known.token_hash, _digest(token))
            ):
                return None
            done, total = max(0, int(body.get("bytes", 0))), int(body.get("total", 0))
            self._pending[key] = (done, total, now, str(phase))
        self.silent[node] = 0.0
        if self.on_progress is not None:
            said = {"node": node, "deployment": deployment, "phase": phase}
            self.on_progress(said | {"bytes": done, "total": total})
        return {"cancel": False, "phase": phase}

    def forget(self, deployment: int) -> None:
        """The deployment changed behind the reports' back (cancelled): every next report
        of its nodes takes the full path."""
        with self._steady_lock:
            for key in [k for k in self._steady if k[0] == deployment]:
                del self._steady[key]

    def flush(self, session: Session) -> None:
        """Write the numbers of the reports taken in memory; a row whose phase moved
        meanwhile (cancelled, failed by the manager) keeps its own, and its node's next
        report takes the full path, which tells it."""
        with self._steady_lock:
            pending, self._pending = self._pending, {}
        row = m.DeploymentNode
        for (deployment, node), (done, total, when, phase) in pending.items():
            changed = session.execute(
                update(row)
                .where(row.deployment_id == deployment, row.node == node, row.phase == phase)
                .values(
                    bytes=done,
                    total=total or row.total,
                    updated=when,
                    started=func.coalesce(row.started, when),
                )
            )
            if not getattr(changed, "rowcount", 1):
                with self._steady_lock:
                    self._steady.pop((deployment, node), None)

    def chunk_path(
        self,
        name: str,
        version: int,
        index: str,
        token: str | None,
        ip: str,
        export: str = "stream",
    ) -> Path:
        """The chunk file, for a node whose running deployment sends this export of this
        image (its stream to install, its squashfs to boot diskless)."""
        return self.chunk(name, version, index, token, ip, export)[0]

    def chunk(
        self,
        name: str,
        version: int,
        index: str,
        token: str | None,
        ip: str,
        export: str = "stream",
    ) -> tuple[Path, RateBudget | None]:
        """:meth:`chunk_path`, and the rate its sending must share, if its transport
        paces its nodes' HTTP fetches (multicast's catch-ups)."""
        ref = f"{name}:{version}"
        with self.session() as s:
            node = _node_at(s, ip)
            self.authorize(s, node or "", token, ip)
            row = Deployments(s).active(node or "")
            if row is None or row.image != ref or self.payload(row).export != export:
                raise NotFound("image chunk for node", f"{node} ({ref} {export})")
            payload = self.payload(row)
            transport = self.transports.get(row.transport)
            budget = (
                transport.pacer(row.deployment_id, payload.ref)
                if isinstance(transport, Paced)
                else None
            )
        if not index.isdigit():
            raise NotFound("image chunk", index)
        path = payload.chunk_path(int(index))
        if not path.is_file():
            raise NotFound("image chunk", f"{payload.ref}/{index}")
        return path, budget

    # -- the manager ----------------------------------------------------------------------

    def tick(self, pool: ThreadPoolExecutor) -> None:
        """One pass: start new nodes, time out silent ones."""
        now = time.time()
        step = min(now - self._ticked, MAX_STEP) if self._ticked else 0.0
        if self._ticked and now - self._ticked > 5 * TICK:
            log.warning("the deployment manager was held up for %.0f s", now - self._ticked)
        self._ticked = now
        settings = self.settings
        boot_timeout = settings.deploy_boot_timeout
        # in turn with the reports' group commits, which would otherwise keep it out
        with self.writer.turns, self.session() as s:
            self.flush(s)
            store = Deployments(s)
            running = store.running()
            for ident in {k[0] for k in self._sessions} - {d.id for d in running}:
                self._end_sessions(store.get(ident))  # ended by a report or a cancel
            for deployment in running:
                if deployment.gather_until is not None:
                    if deployment.gather_until > now:
                        continue  # still gathering the nodes that boot on their own
                    if not any(k[0] == deployment.id for k in self._sessions):
                        close_gathering(deployment, self._sizes(deployment))
                self._sessions_of(s, deployment)
                # one query, not one per node a second (a tenth of a core at 1,000 nodes)
                known = _known_nodes(s, [r.node for r in deployment.nodes if r.phase not in FINAL])
                for row in deployment.nodes:
                    if row.phase in FINAL:
                        continue
                    if row.node not in known:
                        store.fail(row, "the node was removed from the inventory", why=REMOVED)
                        continue
                    if row.powered is None:
                        self._start_node(s, row, pool)
                        continue
                    silent = self.silent[row.node] = self.silent.get(row.node, 0.0) + step
                    if row.phase != WAITING and silent > settings.deploy_node_timeout:
                        store.fail(
                            row,
                            f"no report for {silent:.0f} s in phase {row.phase}: "
                            "the node died or lost its network",
                            why=SILENT,
                        )
                        log.warning("node %s: %s", row.node, row.message)
                    elif row.phase == WAITING and now - row.powered > boot_timeout:
                        store.fail(
                            row,
                            f"did not ask for its plan within {boot_timeout:.0f} s: "
                            + boot_story(NodeStates(s), row.node, row.powered),
                        )
                        log.warning("node %s: %s", row.node, row.message)
                self._end_sessions(deployment)
                if deployment.state != RUNNING:
                    log.info("deployment %d ended: %s", deployment.id, deployment.state)
            self._first_boot_timeouts(s, now)
            self._phase_timeouts(s, now)

    def _sizes(self, deployment: m.Deployment) -> dict[str, int]:
        """Bytes each image of the deployment sends (for ``auto``)."""
        return {r.image: r.total for r in deployment.nodes}

    def _first_boot_timeouts(self, session: Session, now: float) -> None:
        """Fail nodes rebooted into their installed system that never said it came up."""
        limit = self.settings.firstboot_timeout
        if limit <= 0:
            return
        states = NodeStates(session)
        for status in states.awaiting_first_boot():
            if status.updated is not None and now - status.updated > limit:
                when = time.strftime("%H:%M:%S", time.localtime(status.updated))
                if status.state == BOOTING:
                    reason = (
                        f"running: started its diskless image at {when}, whose systemd did "
                        f"not report within {limit:.0f} s (see its console)"
                    )
                else:
                    reason = (
                        f"first-boot: rebooted into its installed system at {when}, which "
                        f"did not report within {limit:.0f} s (did it boot from its disk? see "
                        "its console)"
                    )
                states.record(status.name, FAILED, reason, "corral", reason=TIMEOUT)
                log.warning("node %s: %s", status.name, reason)

    def _phase_timeouts_at(self, now: float) -> None:
        """One pass of :meth:`_phase_timeouts` as if it were ``now``."""
        with self.session() as s:
            self._phase_timeouts(s, now)

    def _phase_timeouts(self, session: Session, now: float) -> None:
        """Fail the nodes that stayed in a phase longer than its timeout (corral.toml)."""
        states = NodeStates(session)
        store = Deployments(session)
        for status in states.in_progress():
            limit = phase_timeout(self.settings, status.phase)
            if not limit or status.updated is None or now - status.updated <= limit:
                continue
            if status.phase in (phases.POWER_OPERATION, *BOOT_STEPS):
                story = boot_story(states, status.name, status.updated - 3600)
                reason = f"stopped booting for longer than timeout_pxe ({limit:.0f} s): {story}"
            else:
                reason = (
                    f"in phase {status.phase} for {now - status.updated:.0f} s, longer "
                    f"than its timeout_{str(status.phase).replace('-', '_')} ({limit:.0f} s)"
                )
            row = store.active(status.name)
            if row is not None:
                store.fail(row, reason, why=TIMEOUT)
            else:
                states.record(status.name, FAILED, reason, "corral", reason=TIMEOUT)
            log.warning("node %s: %s", status.name, reason)

    def _sessions_of(self, session: Session, deployment: m.Deployment) -> None:
        """Start a transfer session for each (image, transport) of the deployment's nodes
        still going, once per server life (again after a restart)."""
        groups: dict[tuple[str, str], list[m.DeploymentNode]] = {}
        for row in deployment.nodes:
            if row.phase not in FINAL:
                groups.setdefault((row.image, row.transport), []).append(row)
        for (image, transport_name), rows in groups.items():
            key = (deployment.id, image, transport_name)
            if key in self._sessions:
                continue
            try:
                payload = self.payload(rows[0])
                transport = self.transports.get(transport_name)
                transport.prepare(payload)
                names = [r.node for r in rows]
                ips, racks = _node_ips(session, names), _node_racks(session, names)
                transport.start(
                    deployment.id,
                    payload,
                    [Member(n, ips.get(n), racks.get(n)) for n in names],
                )
            except CorralError as exc:
                for row in rows:
                    Deployments(session).fail(
                        row, f"cannot serve image {image}: {exc.message}", why=NO_IMAGE
                    )
                log.error("deployment %d: cannot serve %s: %s", deployment.id, image, exc.message)
                continue
            self._sessions.add(key)
            self.plans.ring()
            log.info(
                "deployment %d: %s session for %s, %d node(s)",
                deployment.id,
                transport_name,
                image,
                len(rows),
            )

    def _end_sessions(self, deployment: m.Deployment) -> None:
        for key in [k for k in self._sessions if k[0] == deployment.id]:
            _, image, transport_name = key
            rows = [
                r for r in deployment.nodes if (r.image, r.transport) == (image, transport_name)
            ]
            if rows and all(r.phase in FINAL for r in rows):
                self._sessions.discard(key)
                try:
                    self.transports.get(transport_name).finish(deployment.id, self.payload(rows[0]))
                except Exception:
                    log.exception(
                        "ending the %s session of deployment %d", transport_name, deployment.id
                    )

    def _start_node(
        self, session: Session, row: m.DeploymentNode, pool: ThreadPoolExecutor
    ) -> None:
        """Get the node's image ready, then reboot it into the deploy ramdisk."""
        try:
            self.transports.get(row.transport).prepare(self.payload(row))
        except CorralError as exc:
            Deployments(session).fail(
                row, f"cannot serve image {row.image}: {exc.message}", why=NO_IMAGE
            )
            log.error("node %s: %s", row.node, row.message)
            return
        row.powered = time.time()
        try:
            bmc = node_bmcs(session, [row.node], Vault(self.settings.home))[0]
        except CorralError as exc:  # its BMC password cannot be opened
            Deployments(session).fail(row, f"cannot power the node: {exc.message}", why=POWER)
            log.error("node %s: %s", row.node, row.message)
            return
        if bmc.driver == NO_DRIVER:
            row.message = (
                "waiting for the node to network-boot (corral drives no BMC for it: power it "
                "on or reboot it)"
            )
            return
        row.message = f"power-cycling it through {bmc.driver}"
        pool.submit(self._power, row.deployment_id, bmc)

    def _power(self, deployment: int, bmc: Bmc) -> None:
        """Power-cycle the node into a network boot; a BMC that fails fails the node in
        the phase ``power``, with the BMC's reason (the others go on)."""
        outcome = power(
            [bmc],
            "cycle",
            netboot=True,
            pool=1,
            timeout=self.settings.power_timeout,
            context=PowerContext(home=self.settings.home),
        )[0]
        with self.session() as s:
            NodeStates(s).record(
                bmc.node, phases.POWER_OPERATION, describe_power(outcome, bmc), "corral"
            )
            if not outcome.ok:
                store = Deployments(s)
                store.fail(
                    store.member(deployment, bmc.node),
                    f"power cycle failed: {outcome.reason}",
                    why=POWER,
                )
        if outcome.ok:
            log.info("node %s: power-cycled through %s", bmc.node, bmc.driver)
        else:
            log.error("node %s: power cycle failed: %s", bmc.node, outcome.reason)


#: The phases that have a timeout of their own, and its setting; the others are bounded
#: elsewhere (waiting: deploy_boot_timeout; rebooting and starting: firstboot_timeout;
#: silence mid-deployment: deploy_node_timeout).
PHASE_TIMEOUTS = {
    # dhcp too: only a network boot's DHCP is a step (dnsmasq named it a boot file), not
    # a running system renewing its lease
    **dict.fromkeys((phases.POWER_OPERATION, *BOOT_STEPS), "timeout_pxe"),
    phases.BOOTED: "timeout_booted",
    phases.PRE_INSTALL: "timeout_pre_install",
    phases.PARTITIONING: "timeout_partitioning",
    phases.RECEIVING: "timeout_receiving",
    phases.CONFIGURING: "timeout_configuring",
    phases.BOOTLOADER: "timeout_bootloader",
    phases.POST_INSTALL: "timeout_post_install",
}


def phase_timeout(settings: Settings, phase: str | None) -> float:
    """Seconds a node may stay in ``phase`` (0: no limit of its own)."""
    key = PHASE_TIMEOUTS.get(phase or "")
    return float(getattr(settings, key)) if key else 0.0


#: What a node does after each boot step, for the story of one that stopped.
_NEXT_STEP = {
    phases.POWER_OPERATION: "never asked for an address (DHCP)",
    phases.DHCP: "never loaded its boot program",
    phases.LOADER: "never asked for its boot configuration",
    phases.BOOT_CONFIG: "never fetched its kernel",
    phases.KERNEL: "never fetched its initrd",
    phases.INITRD: "its kernel never reported (see its console)",
}


def boot_story(states: NodeStates, node: str, since: float | None) -> str:
    """How far the node's network boot got since ``since``, from the boot steps corral
    served: "DHCP at 12:00:01, loader ipxe.efi at 12:00:02, never asked for its boot
    configuration"; or that it never asked for an address."""
    steps = states.boot_steps(node, since or 0.0)
    starts = [i for i, step in enumerate(steps) if step.phase == phases.DHCP]
    steps = steps[starts[-1] :] if starts else steps  # this boot's, from its DHCP on
    if not steps:
        return (
            "corral served it nothing, not even DHCP (is it powered on, set to boot from "
            "the network, and on the boot network?)"
        )
    told = [
        f"{e.phase} {e.message} at {time.strftime('%H:%M:%S', time.localtime(e.time))}"
        for e in steps[-4:]
    ]
    return ", ".join([*told, _NEXT_STEP.get(steps[-1].phase, "")]).rstrip(", ")


def report_interval(nodes: int) -> float:
    """Seconds between a node's progress reports in a deployment of ``nodes``: 1 s up to
    20 nodes, then longer, so that the server takes about 20 reports a second (each costs
    it a few milliseconds of CPU and ~0.3 KB on its link, which on the testbed's 2 Mbit/s
    links was 6 % of a broadcast's egress at 100 nodes with 2 s), 5 s at most. Phase
    changes are sent at once whatever it is. Well inside ``deploy_node_timeout`` (25 s)."""
    return min(REPORT_MAX, max(1.0, nodes / REPORTS_PER_SECOND))


class Manager(threading.Thread):
    """Runs :meth:`DeployService.tick` every second until stopped."""

    def __init__(self, service: DeployService) -> None:
        super().__init__(name="corral-deploy", daemon=True)
        self.service = service
        self.stopping = threading.Event()
        # power operations wait on BMCs (ipmitool, redfish) far more than they compute:
        # power_pool at a time power-cycles 100 nodes in seconds, not a minute
        self.pool = ThreadPoolExecutor(
            max_workers=service.settings.power_pool, thread_name_prefix="corral-power"
        )

    def run(self) -> None:
        while not self.stopping.wait(TICK):
            try:
                self.service.tick(self.pool)
            except Exception:
                log.exception("deployment manager: this pass failed; retrying")

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.service.transports.close()


def _words(value: Any) -> list[str]:
    """A variable given as a list of words or as one string of them."""
    if not value:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value).split()


def _node_ips(session: Session, names: list[str]) -> dict[str, str]:
    """Each node's first address (the one it boots and receives on)."""
    from sqlalchemy import select

    rows = session.execute(
        select(m.Node.name, m.Interface.ip)
        .join(m.Interface)
        .where(m.Node.name.in_(names), m.Interface.ip.is_not(None))
        .order_by(m.Node.name, m.Interface.position)
    )
    ips: dict[str, str] = {}
    for name, ip in rows:
        if ip:
            ips.setdefault(name, ip)
    return ips


def _node_racks(session: Session, names: list[str]) -> dict[str, str]:
    """Each node's rack: its ``rack`` variable, merged from its profiles and groups."""
    snapshot = Snapshot(session)
    cache: dict[tuple[str, ...], Any] = {}
    racks: dict[str, str] = {}
    for node in snapshot.nodes(names):
        variables = merge_node(node, snapshot.groups, snapshot.profiles, cache).values["variables"]
        if variables.get(RACK) not in (None, ""):
            racks[node.name] = str(variables[RACK])
    return racks


def _known_nodes(session: Session, names: list[str]) -> set[str]:
    """Those of ``names`` that are in the inventory."""
    from sqlalchemy import select

    return set(session.scalars(select(m.Node.name).where(m.Node.name.in_(names))))


def _node_at(session: Session, ip: str) -> str | None:
    from sqlalchemy import select

    return session.scalar(
        select(m.Node.name).join(m.Interface).where(m.Interface.ip == ip).limit(1)
    )
