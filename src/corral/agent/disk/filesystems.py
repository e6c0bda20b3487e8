"""The layout's filesystems, made by mkfs with the labels and UUIDs the layout chose."""

from __future__ import annotations

import logging

from corral.agent.disk.layout import Layout, Volume
from corral.agent.run import Runner, check

log = logging.getLogger("corral.agent")


def mkfs_argv(volume: Volume) -> list[str] | None:
    """The command that makes ``volume``'s filesystem with its label and UUID."""
    dev, label, uuid = volume.device, volume.label, volume.uuid
    if volume.fstype == "ext4":
        return ["mkfs.ext4", "-F", "-q", "-L", label, "-U", uuid, dev]
    if volume.fstype == "xfs":
        return ["mkfs.xfs", "-f", "-q", "-L", label, "-m", f"uuid={uuid}", dev]
    if volume.fstype in ("vfat", "efi"):
        argv = ["mkfs.vfat", "-n", label, "-i", uuid.replace("-", "")]
        if volume.size_mb >= 64 or volume.grow:
            argv += ["-F", "32"]  # what UEFI firmware reads; too many clusters below 64 MiB
        return [*argv, dev]
    if volume.fstype == "swap":
        return ["mkswap", "-L", label, "-U", uuid, dev]
    return None


def make_filesystems(run: Runner, layout: Layout, *, timeout: float = 1800.0) -> None:
    for v in layout.volumes:
        argv = mkfs_argv(v)
        if argv is None:
            continue
        log.info("%s: %s %s (label %s, UUID %s)", v.device, v.fstype, v.mount, v.label, v.uuid)
        check(run(argv, timeout=timeout), f"making the {v.mount} filesystem on {v.device}")
