"""The partition table: written by ``sfdisk`` from the layout, read back with
``sfdisk --json``, and the kernel's partition devices awaited (and nudged) until they are
the new table's."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from corral.agent.disk.layout import Layout
from corral.agent.disk.sizes import MiB, geometry, sizes_mb
from corral.agent.errors import DiskError
from corral.agent.run import Runner, check, run_while_held

log = logging.getLogger("corral.agent")

#: The partition type of each kind of volume (:attr:`Volume.kind`) in a GPT, then a DOS table.
GPT_TYPES = {
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "efi": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "biosboot": "21686148-6449-6E6F-744E-656564454649",
}

DOS_TYPES = {"linux": "83", "swap": "82", "efi": "ef"}
#: Tries of ``sfdisk`` while it finds the disk in use, half a second apart. A partition
#: unmounted a moment ago (the agent's own look at the system already on the disk) can
#: still be held by udev probing it: sfdisk then refuses ("This disk is currently in
#: use"), which a fresh-clone CI run saw once on a loop device. A disk still in use after
#: that is refused as before: corral never repartitions a disk by ``--force``.
IN_USE_TRIES = 6


def sfdisk_script(layout: Layout, disk_bytes: int) -> str:
    """The input of ``sfdisk`` that makes the layout's partition table."""
    lines = [f"label: {layout.label}", f"label-id: {layout.label_id}", ""]
    boot = next((v for v in layout.volumes if v.mount == "/boot"), layout.root)
    for v, size in zip(layout.volumes, sizes_mb(layout, disk_bytes), strict=True):
        fields = []
        if v.number == 1:
            fields.append("start=2048")
        if size is not None:
            fields.append(f"size={size}MiB")
        if layout.label == "gpt":
            fields.append(f"type={GPT_TYPES[v.kind]}")
            fields.append(f"name={v.label or v.kind}")
        else:
            fields.append(f"type={DOS_TYPES[v.kind]}")
            if v is boot:
                fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def partition(
    run: Runner,
    layout: Layout,
    disk_bytes: int,
    *,
    timeout: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
    exists: Callable[[str], bool] | None = None,
    sysfs: Path = Path("/sys"),
) -> None:
    """Write the layout's partition table (old signatures wiped) and wait for its devices."""
    script = sfdisk_script(layout, disk_bytes)
    log.info(
        "partitioning %s (%s, %d partitions)", layout.device, layout.label, len(layout.volumes)
    )
    for line in script.splitlines():
        log.debug("sfdisk: %s", line)
    argv = ["sfdisk", "--quiet", "--wipe", "always", "--wipe-partitions", "always", layout.device]
    result = run_while_held(
        run,
        argv,
        held="currently in use",
        tries=IN_USE_TRIES,
        sleep=sleep,
        note=f"{layout.device} is in use for a moment: partitioning it again in 0.5 s",
        input=script,
        timeout=120,
    )
    check(result, f"partitioning {layout.device}")
    wait_partitions(
        run,
        layout,
        spans=geometry(layout, disk_bytes),
        timeout=timeout,
        sleep=sleep,
        exists=exists,
        sysfs=sysfs,
    )


def read_table(run: Runner, device: str) -> dict[str, Any] | None:
    """``sfdisk --json``'s view of the disk's partition table, or None (no table)."""
    result = run(["sfdisk", "--json", device], timeout=30)
    if not result.ok:
        return None
    try:
        table = json.loads(result.stdout)["partitiontable"]
    except (ValueError, KeyError, TypeError):
        return None
    return table if isinstance(table, dict) else None


def wait_partitions(
    run: Runner,
    layout: Layout,
    *,
    spans: Sequence[tuple[int, int | None]] | None = None,
    timeout: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
    exists: Callable[[str], bool] | None = None,
    sysfs: Path = Path("/sys"),
) -> None:
    """Wait until every partition of the layout has its device node (and, given
    ``spans``, the kernel has the new start and size of each, not an old table's).

    The kernel learns of a new table from sfdisk's re-read ioctl, which a busy disk (or a
    loop device) can refuse; ``partx`` then tells it partition by partition, and
    ``blockdev --rereadpt`` is the last way to ask.
    """
    exists = exists or _is_block
    devices = [v.device for v in layout.volumes]

    def stale(index: int) -> bool:
        if spans is None:
            return False
        seen = _kernel_span(devices[index], sysfs)
        if seen is None:
            return False
        start, size = spans[index]
        return seen[0] != start * MiB or (size is not None and seen[1] != size * MiB)

    nudges = [
        ["partx", "-u", layout.device],
        ["partx", "-a", layout.device],
        ["blockdev", "--rereadpt", layout.device],
    ]
    waited = 0.0
    step = 0.2
    while True:
        missing = [d for d in devices if not exists(d)]
        old = [d for i, d in enumerate(devices) if d not in missing and stale(i)]
        if not missing and not old:
            return
        if nudges:
            run(nudges.pop(0), timeout=30)
            continue
        for d in missing:
            _mknod_from_sysfs(d, sysfs)
        if waited >= timeout:
            if old:
                raise DiskError(
                    f"the kernel still has the old partitions of {layout.device} "
                    f"({', '.join(old)}): is the disk in use?"
                )
            raise DiskError(
                f"the partitions of {layout.device} did not appear: {', '.join(missing)}"
            )
        sleep(step)
        waited += step


def _kernel_span(device: str, sysfs: Path) -> tuple[int, int] | None:
    """(start, size) in bytes of a partition as the kernel sees it; None if unknown."""
    block = sysfs / "class" / "block" / os.path.basename(device)
    try:
        start = int((block / "start").read_text()) * 512
        size = int((block / "size").read_text()) * 512
    except (OSError, ValueError):
        return None
    return start, size


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _mknod_from_sysfs(device: str, sysfs: Path) -> bool:
    """Make a partition's device node from sysfs when nothing else does (no udev, and a
    devtmpfs that did not add it)."""
    dev = sysfs / "class" / "block" / os.path.basename(device) / "dev"
    try:
        major, minor = (int(x) for x in dev.read_text().strip().split(":"))
        os.mknod(device, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
    except (OSError, ValueError):
        return False
    log.info("%s: made its device node (%d:%d)", device, major, minor)
    return True
