"""The plan's partitions as the installer lays them out: a :class:`Layout`, each partition
a :class:`Volume` with its number and the label and UUID chosen here (so that
``/etc/fstab`` can name them), plus the partitions the bootloader needs.

A layout is also what the stamp in an installed root records (:meth:`Layout.to_stamp`),
which :mod:`corral.agent.disk.reuse` reads back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from corral.agent.errors import DiskError
from corral.agent.plan import Disk, Partition

STAMP_FORMAT = 1

#: Size of the EFI system partition added to a GRUB-booted GPT disk: FAT32 (what every
#: firmware reads) needs at least 65,525 clusters, and GRUB's EFI files take a few MiB.
ESP_MB = 128

#: Filesystem types of a plan's partitions; ``efi`` is vfat holding an EFI system partition.
FSTYPES = ("ext4", "xfs", "vfat", "efi", "swap", "biosboot")

#: Longest filesystem label each mkfs accepts.
LABEL_MAX = {"ext4": 16, "xfs": 12, "vfat": 11, "efi": 11, "swap": 15}


def new_uuid() -> str:
    """A random (version 4) UUID; the uuid module would pull ``platform`` into the ramdisk."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_vfat_id() -> str:
    """A FAT volume id as fstab names it (``UUID=1A2B-3C4D``)."""
    h = os.urandom(4).hex().upper()
    return f"{h[:4]}-{h[4:]}"


def partition_device(disk: str, number: int) -> str:
    """``/dev/sda`` 1 -> ``/dev/sda1``; ``/dev/nvme0n1``, ``/dev/loop3`` -> ``...p1``."""
    return f"{disk}{'p' if disk[-1:].isdigit() else ''}{number}"


@dataclass(frozen=True)
class Volume:
    """One partition of the layout, with what mkfs and fstab need to know of it."""

    number: int
    mount: str  # "/", "/boot", "swap", "biosboot"
    fstype: str
    size_mb: int
    grow: bool
    label: str = ""  # filesystem label
    uuid: str = ""  # filesystem UUID ("" for biosboot)
    device: str = ""

    @property
    def kind(self) -> str:
        """``linux``, ``swap``, ``efi`` or ``biosboot``: the partition's type."""
        if self.fstype in ("swap", "biosboot", "efi"):
            return self.fstype
        if self.fstype == "vfat" and self.mount in ("/boot/efi", "/efi"):
            return "efi"
        return "linux"

    @property
    def mounted(self) -> bool:
        return self.fstype not in ("swap", "biosboot")

    @property
    def kernel_fstype(self) -> str:
        return "vfat" if self.fstype == "efi" else self.fstype

    def shape(self) -> tuple[str, str, int, bool]:
        return (self.mount, self.fstype, self.size_mb, self.grow)


@dataclass(frozen=True)
class Layout:
    device: str
    label: str  # gpt or dos
    label_id: str
    volumes: tuple[Volume, ...] = field(default_factory=tuple)

    @property
    def root(self) -> Volume:
        return next(v for v in self.volumes if v.mount == "/")

    @property
    def esp(self) -> Volume | None:
        return next((v for v in self.volumes if v.kind == "efi"), None)

    @property
    def has_biosboot(self) -> bool:
        return any(v.kind == "biosboot" for v in self.volumes)

    def with_device(self, device: str) -> Layout:
        volumes = tuple(replace(v, device=partition_device(device, v.number)) for v in self.volumes)
        return replace(self, device=device, volumes=volumes)

    def to_stamp(self) -> dict[str, Any]:
        return {
            "format": STAMP_FORMAT,
            "label": self.label,
            "label_id": self.label_id,
            "volumes": [
                {
                    "number": v.number,
                    "mount": v.mount,
                    "fstype": v.fstype,
                    "size_mb": v.size_mb,
                    "grow": v.grow,
                    "label": v.label,
                    "uuid": v.uuid,
                }
                for v in self.volumes
            ],
        }

    @classmethod
    def from_stamp(cls, data: dict[str, Any], device: str) -> Layout:
        """Raises ValueError for a stamp this agent did not write."""
        try:
            if data["format"] != STAMP_FORMAT:
                raise ValueError(f"stamp format {data['format']!r}")
            volumes = tuple(
                Volume(
                    number=int(v["number"]),
                    mount=str(v["mount"]),
                    fstype=str(v["fstype"]),
                    size_mb=int(v["size_mb"]),
                    grow=bool(v["grow"]),
                    label=str(v["label"]),
                    uuid=str(v["uuid"]),
                )
                for v in data["volumes"]
            )
            layout = cls(device, str(data["label"]), str(data["label_id"]), volumes)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed layout stamp: {exc}") from None
        return layout.with_device(device)


def _fs_label(part: Partition) -> str:
    if part.mount == "/":
        name = "root"
    elif part.fstype in ("swap", "biosboot"):
        name = part.fstype
    elif part.fstype == "efi" or part.mount in ("/boot/efi", "/efi"):
        name = "EFI"
    else:
        name = part.mount.strip("/").replace("/", "-") or "data"
    limit = LABEL_MAX.get(part.fstype, 16)
    return (name.upper() if part.fstype in ("vfat", "efi") else name)[:limit]


def make_layout(
    disk: Disk,
    device: str,
    *,
    bootloader: str = "none",
    efi_firmware: bool = False,
    uuid: Callable[[], str] = new_uuid,
    vfat_id: Callable[[], str] = new_vfat_id,
) -> Layout:
    """The plan's partitions, checked, numbered, with fresh labels and UUIDs.

    A GPT disk that GRUB boots gets what both firmwares need when the plan lacks it: a BIOS
    boot partition of 1 MiB (for GRUB's core image) and an EFI system partition of
    :data:`ESP_MB` at ``/boot/efi``, first and in that order. The same layout then boots
    whichever firmware the machine has, also after its firmware is switched.
    ``efi_firmware`` is kept for callers; the layout no longer depends on it.
    """
    label = disk.label.lower()
    if label not in ("gpt", "dos"):
        raise DiskError(f"partition table {disk.label!r}: use gpt or dos")
    parts = list(disk.partitions)
    mounts = [p.mount for p in parts]
    for p in parts:
        if p.fstype not in FSTYPES:
            raise DiskError(f"partition {p.mount}: unknown filesystem {p.fstype!r}")
        if p.fstype in ("swap", "biosboot"):
            if p.mount not in (p.fstype, ""):
                raise DiskError(f"a {p.fstype} partition has no mount point ({p.mount!r})")
        elif not p.mount.startswith("/") or "/../" in p.mount + "/" or "//" in p.mount:
            raise DiskError(f"partition mount point {p.mount!r}: use an absolute path")
        if p.size_mb < 0 or (p.size_mb == 0 and not p.grow):
            raise DiskError(f"partition {p.mount}: size {p.size_mb} MiB")
        if p.fstype == "biosboot" and label != "gpt":
            raise DiskError("a biosboot partition needs a gpt partition table")
    if mounts.count("/") != 1:
        raise DiskError("the layout needs exactly one partition mounted at /")
    mounted = [
        m for p, m in zip(parts, mounts, strict=True) if p.fstype not in ("swap", "biosboot")
    ]
    if len(set(mounted)) != len(mounted):
        raise DiskError("two partitions have the same mount point")
    if label == "gpt" and bootloader == "grub":
        if not any(p.fstype == "efi" for p in parts):
            if "/boot/efi" in mounted:
                raise DiskError("/boot/efi must be an efi partition for GRUB on UEFI")
            parts.insert(0, Partition(mount="/boot/efi", fstype="efi", size_mb=ESP_MB))
        if not any(p.fstype == "biosboot" for p in parts):
            parts.insert(0, Partition(mount="biosboot", fstype="biosboot", size_mb=1))
    if label == "dos" and len(parts) > 4:
        raise DiskError(f"a dos partition table holds 4 partitions, the layout has {len(parts)}")
    volumes = []
    for number, p in enumerate(parts, start=1):
        mount = p.fstype if p.fstype in ("swap", "biosboot") else p.mount
        ident = (
            "" if p.fstype == "biosboot" else vfat_id() if p.fstype in ("vfat", "efi") else uuid()
        )
        volumes.append(
            Volume(
                number=number,
                mount=mount,
                fstype=p.fstype,
                size_mb=p.size_mb,
                grow=p.grow,
                label="" if p.fstype == "biosboot" else _fs_label(p),
                uuid=ident,
            )
        )
    label_id = uuid().upper() if label == "gpt" else "0x" + os.urandom(4).hex()
    return Layout("", label, label_id, tuple(volumes)).with_device(device)
