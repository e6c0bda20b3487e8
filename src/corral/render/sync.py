"""Writing the whole boot tree: atomically, incrementally, and removing what is stale.

A sync root remembers the inventory generation it was last synced at. An incremental
sync re-renders only the nodes whose inputs changed since then (the node itself, or a
profile, group or distro it uses), compares each file with what is on disk, and
writes only what differs, each through a temporary name and a rename. A node whose
files fail to render or validate is reported, and nothing of it is written.

Rendering, validation and writing are independent per node, so a large sync runs them
in chunks on every core (forked workers that inherit the loaded inventory); the parent
keeps the database work.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from corral import __version__
from corral.config import Settings
from corral.errors import InvalidBootFile, RenderError
from corral.files import write_atomic
from corral.inventory import models as m
from corral.inventory.merge import profile_chain
from corral.inventory.schema import NodeSpec
from corral.render.environment import fingerprint
from corral.render.grubcheck import check_grub
from corral.render.kscheck import get_validator
from corral.render.renderer import RenderedFile, Renderer, Snapshot

SHARED_OWNER = ""
# Below this many nodes, starting worker processes costs more than it saves.
PARALLEL_MIN_NODES = 400
CHUNK = 250


@dataclass
class SyncReport:
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    nodes: int = 0
    full: bool = False
    failures: list[RenderError] = field(default_factory=list)


@dataclass
class ChunkResult:
    # owner -> [(path, digest)] of the files it now has
    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    written: int = 0
    unchanged: int = 0
    failures: list[RenderError] = field(default_factory=list)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".corral-sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _changed_nodes(session: Session, snapshot: Snapshot, since: int) -> tuple[set[str], set[str]]:
    """Names of nodes to re-render, and of removed nodes whose files must go."""
    changed = set(session.scalars(select(m.Node.name).where(m.Node.gen > since)))
    removed = select(m.Tombstone.name).where(m.Tombstone.gen > since)
    gone = set(session.scalars(removed.where(m.Tombstone.kind == "node")))
    touched: dict[str, set[str]] = {}
    for kind, table in (("profile", m.Profile), ("group", m.Group), ("distro", m.Distro)):
        names = set(session.scalars(select(table.name).where(table.gen > since)))
        touched[kind] = names | set(session.scalars(removed.where(m.Tombstone.kind == kind)))
    if any(touched.values()):
        # A shared entity changed: find the nodes that use it (rare; scans all nodes).
        profiles = touched["profile"] | {
            p.name for p in snapshot.profiles.values() if p.distro in touched["distro"]
        }
        for node in snapshot.nodes():
            chain = profile_chain(node, snapshot.groups)
            if set(node.groups) & touched["group"] or set(chain) & profiles:
                changed.add(node.name)
    return changed - gone, gone


def render_chunk(renderer: Renderer, root: Path, nodes: list[NodeSpec]) -> ChunkResult:
    """Render, validate and write a chunk of nodes; a node that fails writes nothing."""
    result = ChunkResult()
    rendered: dict[str, list[RenderedFile]] = {}
    for node in nodes:
        try:
            files = renderer.render_node(node)
            for f in files:
                if f.kind == "kickstart":
                    distro = renderer.distro_of(node, renderer.merged(node))
                    assert distro is not None  # render_node renders kickstarts only then
                    problem = get_validator(distro.os_version).check(f.content, f.path)
                    if problem:
                        raise InvalidBootFile(
                            node.name, problem.path, problem.line, problem.message
                        )
            rendered[node.name] = files
        except RenderError as exc:
            result.failures.append(exc)
    grubs = [(f.path, f.content) for fs in rendered.values() for f in fs if f.kind == "grub"]
    bad = {p.path: p for p in check_grub(grubs)}
    for owner, files in rendered.items():
        problem = next((bad[f.path] for f in files if f.path in bad), None)
        if problem is not None:
            result.failures.append(
                InvalidBootFile(owner, problem.path, problem.line, problem.message)
            )
            continue
        result.files[owner] = [_write_if_changed(root, f, result) for f in files]
    return result


def _write_if_changed(root: Path, f: RenderedFile, result: ChunkResult) -> tuple[str, str]:
    data = f.content.encode()
    path = root / f.path
    try:
        same = path.read_bytes() == data
    except OSError:
        same = False
    if same:
        result.unchanged += 1
    else:
        write_atomic(path, data)  # no race: syncs of one root hold a lock (Syncer.run)
        result.written += 1
    return f.path, _digest(data)


# What forked workers inherit: set just before the pool starts, read only by workers.
_WORK: tuple[Renderer, Path, list[NodeSpec]] | None = None


def _render_slice(bounds: tuple[int, int]) -> ChunkResult:
    assert _WORK is not None
    renderer, root, nodes = _WORK
    return render_chunk(renderer, root, nodes[bounds[0] : bounds[1]])


class Syncer:
    def __init__(self, settings: Settings, session: Session, root: Path) -> None:
        self.settings = settings
        self.session = session
        self.root = root.resolve()
        self.snapshot = Snapshot(session)
        self.renderer = Renderer(settings, self.snapshot)

    def _root_row(self) -> m.SyncRoot:
        row = self.session.scalar(select(m.SyncRoot).where(m.SyncRoot.path == str(self.root)))
        if row is None:
            row = m.SyncRoot(path=str(self.root), gen=-1, fingerprint="")
            self.session.add(row)
            self.session.flush()
        return row

    def run(
        self, full: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> SyncReport:
        with _root_lock(self.root):
            return self._run(full, progress)

    def _run(self, full: bool, progress: Callable[[int, int], None] | None) -> SyncReport:
        row = self._root_row()
        generation = self.session.scalar(select(m.Meta.value).where(m.Meta.key == "generation"))
        stamp = fingerprint(self.settings.templates) + __version__ + self.settings.server_url
        stamp = _digest(stamp.encode())
        report = SyncReport(full=full or row.fingerprint != stamp or row.gen < 0)
        if report.full:
            targets = set(self.session.scalars(select(m.Node.name)))
            owners = set(
                self.session.scalars(
                    select(m.SyncFile.owner).where(m.SyncFile.root_id == row.id).distinct()
                )
            )
            gone = owners - targets - {SHARED_OWNER}
        else:
            targets, gone = _changed_nodes(self.session, self.snapshot, row.gen)
        report.nodes = len(targets)

        nodes = list(self.snapshot.nodes(targets))
        done = ChunkResult()
        for chunk in self._render(nodes):
            done.files.update(chunk.files)
            done.written += chunk.written
            done.unchanged += chunk.unchanged
            done.failures += chunk.failures
            if progress:
                progress(len(done.files) + len(done.failures), len(nodes))
        shared = ChunkResult()
        for f in self.renderer.render_shared():
            shared.files.setdefault(SHARED_OWNER, []).append(
                _write_if_changed(self.root, f, shared)
            )
        done.files.update(shared.files)
        for owner in gone:
            done.files[owner] = []
        report.written = done.written + shared.written
        report.unchanged = done.unchanged + shared.unchanged
        report.failures = done.failures
        report.removed = self._record(row, done.files)
        # A root with failures stays at its old generation so the next sync retries them.
        if not report.failures:
            row.gen = generation or 0
            row.fingerprint = stamp
        self.session.flush()
        return report

    def _render(self, nodes: list[NodeSpec]) -> Iterator[ChunkResult]:
        workers = min(os.cpu_count() or 1, len(nodes) // CHUNK + 1)
        if len(nodes) < PARALLEL_MIN_NODES or workers < 2:
            yield render_chunk(self.renderer, self.root, nodes)
            return
        global _WORK
        _WORK = (self.renderer, self.root, nodes)
        try:
            bounds = [(i, min(i + CHUNK, len(nodes))) for i in range(0, len(nodes), CHUNK)]
            # Unlike multiprocessing.Pool, the executor reports a dead worker instead of
            # waiting for it forever.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for future in as_completed([pool.submit(_render_slice, b) for b in bounds]):
                    yield future.result()
        finally:
            _WORK = None

    def _record(self, row: m.SyncRoot, files: dict[str, list[tuple[str, str]]]) -> int:
        """Store which files each owner has now; remove the ones no owner has any more."""
        owners = list(files)
        before: set[str] = set()
        for i in range(0, len(owners), 500):
            batch = owners[i : i + 500]
            mine = (m.SyncFile.root_id == row.id) & m.SyncFile.owner.in_(batch)
            before.update(self.session.scalars(select(m.SyncFile.path).where(mine)))
            self.session.execute(delete(m.SyncFile).where(mine))
        records = [
            {"root_id": row.id, "owner": owner, "path": path, "digest": digest}
            for owner, pairs in files.items()
            for path, digest in pairs
        ]
        # A path can pass from one node to another (a MAC moved): it is not stale then.
        stale = before - {r["path"] for r in records}
        for path in stale:
            (self.root / path).unlink(missing_ok=True)
        if records:
            # Core executemany: the ORM's bulk path costs several times more here.
            self.session.connection().execute(insert(m.Base.metadata.tables["sync_file"]), records)
        return len(stale)
