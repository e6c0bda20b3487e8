"""The layout stamp a deployment leaves in the installed root, and what the next one
makes of it: whether corral made the disk at all, and whether its filesystems can stay.

Reusing a disk (no sfdisk, no mkfs). An incremental receiver (rsync) only sends what
changed, which is worthless if the filesystems were just made empty; so the installer keeps
them when, and only when, all of these hold:

- the disk has a partition table of the plan's label type whose identifier (the GPT disk
  GUID, the DOS disk id) is the one recorded in the stamp below: this agent made it;
- the partition that holds ``/`` mounts and has the stamp
  ``/etc/corral/layout.json`` (:data:`STAMP`), written by the deployment that made the
  filesystems;
- the stamp's partitions are the plan's: same number, and each the same mount point,
  filesystem type, size and growth, in order.

Anything else (another layout, a disk partitioned by other means, no or an unreadable
stamp, a transport that writes everything anew) repartitions and formats. The stamp keeps
the filesystems' UUIDs, so ``/etc/fstab`` stays the same across such re-deployments.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from corral.agent.disk.layout import Layout
from corral.agent.disk.mounts import Mounts
from corral.agent.disk.table import read_table, wait_partitions
from corral.agent.errors import DiskError
from corral.agent.run import CommandFailed, Runner

log = logging.getLogger("corral.agent")

#: Where the installed root records the layout its filesystems were made for.
STAMP = "etc/corral/layout.json"


def write_stamp(target: Path, layout: Layout) -> None:
    path = target / STAMP
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(layout.to_stamp(), indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def made_by_corral(run: Runner, mounts: Mounts, device: str, scratch: Path) -> bool:
    """Whether a file system on ``device`` holds corral's layout stamp: the disk is one
    corral installed, which it may partition again without being told to wipe it."""
    table = read_table(run, device) or {}
    for part in table.get("partitions") or []:
        node = str(part.get("node", ""))
        if not node:
            continue
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            mounts.mount(node, scratch, options="ro")
        except CommandFailed:
            continue  # not a file system the kernel reads: swap, a BIOS boot partition...
        try:
            if (scratch / STAMP).is_file():
                return True
        finally:
            mounts.unmount(scratch)
    return False


def foreign_table(run: Runner, mounts: Mounts, device: str, scratch: Path) -> str | None:
    """A description of the partition table on ``device`` if corral did not make it
    (None: no table, or corral's own)."""
    table = read_table(run, device)
    parts = (table or {}).get("partitions") or []
    if not parts or made_by_corral(run, mounts, device, scratch):
        return None
    names = ", ".join(str(p.get("name") or p.get("type", "?")) for p in parts[:6])
    label = (table or {}).get("label", "?")
    return f"a {label} partition table of {len(parts)} partition(s) ({names})"


def find_reusable(
    run: Runner,
    mounts: Mounts,
    wanted: Layout,
    scratch: Path,
    *,
    timeout: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    exists: Callable[[str], bool] | None = None,
) -> Layout | None:
    """The layout already on the disk if it is the one wanted (see the module's rule),
    with its filesystems' UUIDs; None if the disk must be partitioned and formatted."""
    table = read_table(run, wanted.device)
    if table is None:
        log.info("%s: no partition table to reuse", wanted.device)
        return None
    parts = table.get("partitions") or []
    if table.get("label") != wanted.label or len(parts) != len(wanted.volumes):
        log.info("%s: its partition table is not the planned one", wanted.device)
        return None
    try:
        wait_partitions(run, wanted, timeout=timeout, sleep=sleep, exists=exists)
    except DiskError as exc:
        log.info("%s: not reused: %s", wanted.device, exc)
        return None
    root = wanted.root
    stamp_text = None
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        # not read-only: the disk is written from here on whatever is found, and a
        # read-only mount of a filesystem that another mount namespace still holds
        # read-write is refused where a read-write one shares it
        mounts.mount(root.device, scratch, fstype=root.kernel_fstype)
    except CommandFailed as exc:
        log.info("%s: not reused: %s", wanted.device, exc)
        return None
    try:
        stamp_text = (scratch / STAMP).read_text()
    except OSError:
        stamp_text = None
    finally:
        mounts.unmount(scratch)
    if stamp_text is None:
        log.info("%s: no %s on %s: formatting", wanted.device, STAMP, root.device)
        return None
    try:
        found = Layout.from_stamp(json.loads(stamp_text), wanted.device)
    except ValueError as exc:
        log.info("%s: %s: formatting", wanted.device, exc)
        return None
    same_table = str(table.get("id", "")).lower() == found.label_id.lower()
    same_shape = [v.shape() for v in found.volumes] == [v.shape() for v in wanted.volumes]
    if not (same_table and same_shape and found.label == wanted.label):
        log.info("%s: the filesystems were made for another layout: formatting", wanted.device)
        return None
    log.info("%s: keeping the filesystems of the previous deployment", wanted.device)
    return found
