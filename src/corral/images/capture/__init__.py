"""Capturing an image from a running machine: its root tree, copied over rsync and SSH.

``corral image capture NODE --name NAME`` makes the next version of ``NAME`` from a golden
node set up by hand. It runs in three steps:

1. One SSH call (:func:`probe`) checks what would otherwise fail halfway with a worse
   message (the node answers, takes the login, has rsync, has the source directory) and
   reads the node's mount table and swap files.
2. rsync copies the tree into a staging directory inside the store. When the image has a
   version already, the staging tree starts as a copy of it (``cp --reflink``: almost
   free on btrfs and XFS, a local copy elsewhere), so a recapture sends only what changed.
3. The tree loses the node's identity (:func:`corral.images.build.tree.strip_identity`, as
   every other way into the store) and becomes the version in one rename
   (:meth:`ImageStore.add_version`); the manifest then records where it came from.

Whatever stops it before the rename (an error, Ctrl-C, SIGTERM) removes the staging
directory; a capture killed outright leaves it in ``<store>/.tmp`` for
:meth:`ImageStore.gc`. No half version is ever visible.

The modules of this package: :mod:`~corral.images.capture.source` (the machine, and how
SSH reaches it), :mod:`~corral.images.capture.probe` (the first SSH call, and what the node
says), :mod:`~corral.images.capture.rsync` (the copy: its options, its progress, how it
failed); this one runs a capture.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.images.build.tree import discard, strip_identity
from corral.images.capture.errors import CaptureError
from corral.images.capture.probe import probe
from corral.images.capture.rsync import (
    RSYNC_VANISHED,
    ProgressCallback,
    Transfer,
    check_rsync_outcome,
    excludes_for,
    rsync_argv,
    rsync_escape,
    run_rsync,
)
from corral.images.capture.source import Source, ssh_env
from corral.images.chroot import Runner
from corral.images.store import (
    ImageStore,
    ImageVersion,
    check_name,
    copy_tree,
    flocked,
    read_manifest,
    remove_tree,
    write_manifest,
)
from corral.run import run

log = logging.getLogger("corral.images")


@dataclass(frozen=True)
class CaptureResult:
    """A captured version and what the copy took."""

    version: ImageVersion
    seconds: float
    received_bytes: int | None
    files_transferred: int | None
    seeded_from: str | None
    filesystems: list[str] = field(default_factory=list)


StepCallback = Callable[[str], None]


def capture(
    store: ImageStore,
    name: str,
    source: Source,
    excludes: Sequence[str] = (),
    *,
    on_step: StepCallback | None = None,
    on_progress: ProgressCallback | None = None,
    runner: Runner = run,
    transfer: Transfer = run_rsync,
) -> CaptureResult:
    """Copy ``source``'s tree into the next version of ``name`` (see the module docs)."""
    check_name(name)
    step = on_step or (lambda text: None)
    started = time.monotonic()
    started_at = _now()
    for program, package in (("rsync", "rsync"), ("ssh", "openssh-client")):
        if shutil.which(program) is None:
            raise CaptureError(
                f"{program} is not installed on this machine",
                f"install it: apt-get install {package} ('make setup' does)",
            )
    if source.known_hosts is not None:
        source.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    step("connecting")
    found = probe(source, runner)
    own = [f"/{rsync_escape(m)}/lost+found" for m in found.mounts]  # each mkfs makes one
    patterns = excludes_for(excludes, [*own, *found.swap_excludes])
    tmp_root = store.root / ".tmp"  # where ImageStore.gc() finds what a killed capture left
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".capture-{name}.", suffix=f".tmp-{os.getpid()}", dir=tmp_root)
    )
    seed: ImageVersion | None = None
    try:
        tree = staging / "rootfs"
        if name in store.names():
            seed = store.get(name)
            step(f"starting from {seed.ref}")
            copy_tree(seed.rootfs, tree)
        else:
            tree.mkdir(mode=0o755)
        step("copying")
        argv = rsync_argv(source, tree, patterns, found.mounts)
        outcome = transfer(argv, env=ssh_env(), on_progress=on_progress)
        check_rsync_outcome(outcome, source, store)
        if outcome.returncode == RSYNC_VANISHED:
            log.warning("%s: some files vanished during the copy", source.host)
        strip_identity(tree)
        step("adding the version")
        origin = f"capture {source.where}:{source.path}"
        version = store.add_version(name, tree, origin=origin, move=True)
    finally:
        discard(staging)  # stops whatever still runs in it, then empties it
        remove_tree(staging)
    filesystems = ["/", *(f"/{m}" for m in found.mounts)]
    record = {
        "host": source.host,
        "node": source.node,
        "hostname": found.hostname,
        "user": source.user,
        "port": source.port,
        "source_path": source.path,
        "filesystems": filesystems,
        "excludes": patterns,
        "started": started_at,
        "finished": _now(),
        "seeded_from": seed.ref if seed else None,
        "received_bytes": outcome.received_bytes,
        "files_transferred": outcome.files_transferred,
        "vanished_files": outcome.returncode == RSYNC_VANISHED,
    }
    version = record_capture(version, record)
    return CaptureResult(
        version=version,
        seconds=time.monotonic() - started,
        received_bytes=outcome.received_bytes,
        files_transferred=outcome.files_transferred,
        seeded_from=seed.ref if seed else None,
        filesystems=filesystems,
    )


def record_capture(version: ImageVersion, record: dict[str, Any]) -> ImageVersion:
    """Add ``capture`` to the version's manifest (its ``origin`` says so already).

    Under the lock :func:`corral.images.exports.build_exports` holds around its own
    read-modify-write of the manifest, so neither loses the other's change.
    """
    version.exports_dir.mkdir(exist_ok=True)
    with flocked(version.exports_dir / ".lock"):
        manifest = read_manifest(version.path)
        manifest["capture"] = record
        write_manifest(version.path, manifest)
    return ImageVersion.load(version.path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
