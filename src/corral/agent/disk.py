"""The node's disk: size check, partitions, filesystems, mounts, and when to keep them.

Order of work, so that a plan that cannot fit never touches the disk: :func:`make_layout`
(the plan's partitions plus what the bootloader needs, each with a label and a UUID chosen
here, so that ``/etc/fstab`` can name them), :func:`check_size`, then either
:func:`find_reusable` or :func:`partition` and :func:`make_filesystems`, then
:func:`mount_layout` through a :class:`Mounts`, which unmounts everything it mounted.

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

Commands run through a :data:`~corral.agent.run.Runner` so that tests can record them;
:class:`~corral.agent.run.SubprocessRunner` is the real one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.agent.errors import InstallError
from corral.agent.plan import Disk, Partition
from corral.agent.run import CommandFailed, Runner, check

log = logging.getLogger("corral.agent")

MiB = 1 << 20

#: Where the installed root records the layout its filesystems were made for.
STAMP = "etc/corral/layout.json"
STAMP_FORMAT = 1

#: Size of the EFI system partition added to a GRUB-booted GPT disk: FAT32 (what every
#: firmware reads) needs at least 65,525 clusters, and GRUB's EFI files take a few MiB.
ESP_MB = 128

#: Filesystem types of a plan's partitions; ``efi`` is vfat holding an EFI system partition.
FSTYPES = ("ext4", "xfs", "vfat", "efi", "swap", "biosboot")

GPT_TYPES = {
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "efi": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "biosboot": "21686148-6449-6E6F-744E-656564454649",
}
DOS_TYPES = {"linux": "83", "swap": "82", "efi": "ef"}

#: Longest filesystem label each mkfs accepts.
LABEL_MAX = {"ext4": 16, "xfs": 12, "vfat": 11, "efi": 11, "swap": 15}

#: Room the partition table takes: the first MiB (GPT header, alignment) and, for GPT, its
#: backup copy at the end of the disk.
TABLE_OVERHEAD_MB = 2

#: How much more than the image's unpacked size the root filesystem must offer (metadata,
#: journal, the files the installer adds).
ROOT_MARGIN = 1.1


class DiskError(InstallError):
    """The disk cannot take the plan; the message is the one-line reason."""


class DiskTooSmall(DiskError):
    pass


# --- the layout ------------------------------------------------------------------------


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


# --- doing it --------------------------------------------------------------------------


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


def geometry(layout: Layout, disk_bytes: int) -> list[tuple[int, int | None]]:
    """Where each partition starts and how long it is, in MiB (None: to the end), as
    :func:`sfdisk_script` lays them out: from 1 MiB on, one after the other."""
    spans: list[tuple[int, int | None]] = []
    start = 1
    for size in sizes_mb(layout, disk_bytes):
        spans.append((start, size))
        start += size or 0
    return spans


def _kernel_span(device: str, sysfs: Path) -> tuple[int, int] | None:
    """(start, size) in bytes of a partition as the kernel sees it; None if unknown."""
    block = sysfs / "class" / "block" / os.path.basename(device)
    try:
        start = int((block / "start").read_text()) * 512
        size = int((block / "size").read_text()) * 512
    except (OSError, ValueError):
        return None
    return start, size


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
    check(run(argv, input=script, timeout=120), f"partitioning {layout.device}")
    wait_partitions(
        run,
        layout,
        spans=geometry(layout, disk_bytes),
        timeout=timeout,
        sleep=sleep,
        exists=exists,
        sysfs=sysfs,
    )


def make_filesystems(run: Runner, layout: Layout, *, timeout: float = 1800.0) -> None:
    for v in layout.volumes:
        argv = mkfs_argv(v)
        if argv is None:
            continue
        log.info("%s: %s %s (label %s, UUID %s)", v.device, v.fstype, v.mount, v.label, v.uuid)
        check(run(argv, timeout=timeout), f"making the {v.mount} filesystem on {v.device}")


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


def write_stamp(target: Path, layout: Layout) -> None:
    path = target / STAMP
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(layout.to_stamp(), indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# --- mounts ----------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return []
    base = os.path.realpath(path)
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        point = _unescape(fields[1])
        if point == base or point.startswith(base.rstrip("/") + "/"):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


class Mounts:
    """What this deployment mounted, unmounted in reverse order on every way out."""

    def __init__(
        self,
        run: Runner,
        *,
        sleep: Callable[[float], None] = time.sleep,
        tries: int = 5,
    ) -> None:
        self.run = run
        self.sleep = sleep
        self.tries = tries
        self.stack: list[str] = []

    def mount(
        self,
        source: str,
        target: Path,
        *,
        fstype: str | None = None,
        options: str | None = None,
    ) -> None:
        target.mkdir(parents=True, exist_ok=True)
        argv = ["mount"]
        if fstype:
            argv += ["-t", fstype]
        if options:
            argv += ["-o", options]
        argv += [source, str(target)]
        result = self.run(argv, timeout=120)
        for _ in range(self.tries - 1):
            # a device unmounted a moment ago can still be held (by the kernel tearing its
            # filesystem down, or by a tool probing it): "already mounted or busy"
            if result.ok or "busy" not in result.stderr:
                break
            self.sleep(0.5)
            result = self.run(argv, timeout=120)
        check(result, f"mounting {source}")
        self.stack.append(str(target))

    def bind(self, source: str, target: Path) -> None:
        self.mount(source, target, options="bind")

    def unmount(self, target: Path | str) -> bool:
        """Unmount one mount point, patiently (a tool that just exited may still hold it),
        lazily as the last resort; False if even that failed."""
        point = str(target)
        ok = False
        for attempt in range(self.tries):
            if self.run(["umount", point], timeout=60).ok:
                ok = True
                break
            if attempt + 1 < self.tries:
                self.sleep(0.5)
        if not ok:
            log.warning("%s is busy: detaching it lazily", point)
            ok = self.run(["umount", "-l", point], timeout=60).ok
        if point in self.stack:
            self.stack.remove(point)
        if not ok:
            log.error("could not unmount %s", point)
        return ok

    def unmount_all(self) -> list[str]:
        """Unmount everything, newest first; the mount points that stayed."""
        failed = []
        while self.stack:
            point = self.stack[-1]
            if not self.unmount(point):
                failed.append(point)
        return failed

    def clear(self, path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> None:
        """Unmount what an earlier run left at or below ``path``."""
        for point in mounts_under(path, mounts_file):
            log.warning("%s: left mounted by an earlier run: unmounting it", point)
            self.unmount(point)

    def __enter__(self) -> Mounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount_all()


def mount_layout(mounts: Mounts, layout: Layout, target: Path) -> None:
    """Mount the layout's filesystems under ``target``, parents before children."""
    order = sorted(
        (v for v in layout.volumes if v.mounted),
        key=lambda v: (v.mount.rstrip("/").count("/"), v.mount),
    )
    for v in order:
        point = target / v.mount.lstrip("/")
        mounts.mount(v.device, point, fstype=v.kernel_fstype)
