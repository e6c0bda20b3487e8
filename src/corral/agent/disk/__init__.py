"""The node's disk: size check, partitions, filesystems, mounts, and when to keep them.

Order of work, so that a plan that cannot fit never touches the disk: :func:`make_layout`
(the plan's partitions plus what the bootloader needs, each with a label and a UUID chosen
here, so that ``/etc/fstab`` can name them), :func:`check_size`, then either
:func:`find_reusable` or :func:`partition` and :func:`make_filesystems`, then
:func:`mount_layout` through a :class:`Mounts`, which unmounts everything it mounted.

Its modules, in that order:

- :mod:`.layout`, the plan's partitions as a :class:`Layout` of :class:`Volume` objects;
- :mod:`.sizes`, how big the disk is and what the layout needs of it;
- :mod:`.table`, the partition table (sfdisk) and the kernel's devices for it;
- :mod:`.filesystems`, mkfs;
- :mod:`.mounts`, mounting the layout and unmounting it on every way out;
- :mod:`.reuse`, the stamp a deployment leaves and when the next one keeps the filesystems.

Commands run through a :data:`~corral.agent.run.Runner` so that tests can record them;
:class:`~corral.agent.run.SubprocessRunner` is the real one. A command that fails raises
:class:`~corral.agent.run.CommandFailed`; a disk that cannot take the plan,
:class:`~corral.agent.errors.DiskError`.
"""

from corral.agent.disk.filesystems import make_filesystems, mkfs_argv
from corral.agent.disk.layout import (
    ESP_MB,
    FSTYPES,
    Layout,
    Volume,
    make_layout,
    partition_device,
)
from corral.agent.disk.mounts import Mounts, mount_layout, mounts_under
from corral.agent.disk.reuse import STAMP, find_reusable, foreign_table, write_stamp
from corral.agent.disk.sizes import (
    DiskTooSmall,
    MiB,
    check_size,
    disk_size,
    geometry,
    required_mb,
    sizes_mb,
)
from corral.agent.disk.table import (
    DOS_TYPES,
    GPT_TYPES,
    partition,
    sfdisk_script,
    wait_partitions,
)
from corral.agent.errors import DiskError
from corral.agent.run import CommandFailed

__all__ = [
    "DOS_TYPES",
    "ESP_MB",
    "FSTYPES",
    "GPT_TYPES",
    "STAMP",
    "CommandFailed",
    "DiskError",
    "DiskTooSmall",
    "Layout",
    "MiB",
    "Mounts",
    "Volume",
    "check_size",
    "disk_size",
    "find_reusable",
    "foreign_table",
    "geometry",
    "make_filesystems",
    "make_layout",
    "mkfs_argv",
    "mount_layout",
    "mounts_under",
    "partition",
    "partition_device",
    "required_mb",
    "sfdisk_script",
    "sizes_mb",
    "wait_partitions",
    "write_stamp",
]
