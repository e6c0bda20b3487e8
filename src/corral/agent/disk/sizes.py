"""How big the disk is, how much of it the layout needs, and how much each partition gets.

Partitions are measured in MiB; the disk and the image, in bytes."""

from __future__ import annotations

import os
from pathlib import Path

from corral.agent.disk.layout import Layout
from corral.agent.errors import DiskError
from corral.agent.run import Runner

MiB = 1 << 20

#: Room the partition table takes: the first MiB (GPT header, alignment) and, for GPT, its
#: backup copy at the end of the disk.
TABLE_OVERHEAD_MB = 2

#: How much more than the image's unpacked size the root filesystem must offer (metadata,
#: journal, the files the installer adds).
ROOT_MARGIN = 1.1


class DiskTooSmall(DiskError):
    """The disk, or the plan's / partition, cannot hold the layout and the image."""


def disk_size(run: Runner, device: str, sysfs: Path = Path("/sys")) -> int:
    """Bytes of ``device``, from ``blockdev``, else from sysfs."""
    result = run(["blockdev", "--getsize64", device], timeout=30)
    text = result.stdout.strip()
    if result.ok and text.isdigit():
        return int(text)
    sectors = sysfs / "class" / "block" / os.path.basename(device) / "size"
    try:
        return int(sectors.read_text().strip()) * 512
    except (OSError, ValueError):
        raise DiskError(f"cannot read the size of {device}: {result.reason()}") from None


def required_mb(layout: Layout, tree_bytes: int) -> int:
    """MiB the disk must have: every partition at its size, the root one at least
    :data:`ROOT_MARGIN` times the image, and the partition table's own room."""
    total = TABLE_OVERHEAD_MB
    for v in layout.volumes:
        size = v.size_mb
        if v.mount == "/":
            size = max(size, -(-int(tree_bytes * ROOT_MARGIN) // MiB))
        total += size
    return total


def check_size(layout: Layout, tree_bytes: int, disk_bytes: int) -> None:
    """Raise :class:`DiskTooSmall` unless the layout and the image fit on the disk."""
    need_root = -(-int(tree_bytes * ROOT_MARGIN) // MiB)
    root = layout.root
    if not root.grow and root.size_mb < need_root:
        raise DiskTooSmall(
            f"the / partition ({root.size_mb} MiB) cannot hold the image "
            f"({tree_bytes / MiB:.0f} MiB unpacked, {need_root} MiB with room to spare)"
        )
    need = required_mb(layout, tree_bytes)
    have = disk_bytes // MiB
    if have < need:
        raise DiskTooSmall(
            f"disk {layout.device} is too small: {have} MiB, the layout needs {need} MiB "
            f"({tree_bytes / MiB:.0f} MiB of image unpacked into / with 10% to spare)"
        )


def sizes_mb(layout: Layout, disk_bytes: int) -> list[int | None]:
    """The size of each partition; None for a growing last one (sfdisk gives it the
    rest, to the sector). Growing partitions share what the fixed ones leave."""
    volumes = layout.volumes
    growing = [v for v in volumes if v.grow]
    spare = disk_bytes // MiB - TABLE_OVERHEAD_MB - sum(v.size_mb for v in volumes)
    share = max(spare, 0) // len(growing) if growing else 0
    sizes: list[int | None] = []
    for i, v in enumerate(volumes):
        if v.grow and i == len(volumes) - 1:
            sizes.append(None)
        else:
            sizes.append(v.size_mb + (share if v.grow else 0))
    return sizes


def geometry(layout: Layout, disk_bytes: int) -> list[tuple[int, int | None]]:
    """Where each partition starts and how long it is, in MiB (None: to the end), as
    :func:`~corral.agent.disk.table.sfdisk_script` lays them out: from 1 MiB on, one after
    the other."""
    spans: list[tuple[int, int | None]] = []
    start = 1
    for size in sizes_mb(layout, disk_bytes):
        spans.append((start, size))
        start += size or 0
    return spans
