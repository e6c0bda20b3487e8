"""What the machine is: CPUs, memory, disks and NICs, read from /proc and /sys."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Block devices that are not disks one could install on.
_VIRTUAL_BLOCK = ("loop", "ram", "zram", "sr", "fd", "nbd", "dm-", "md", "zd")


def read_text(path: Path, default: str | None = None) -> str | None:
    """The stripped content of a small (sysfs, procfs) file, or ``default``."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return default


def _read_int(path: Path) -> int | None:
    text = read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Disk:
    name: str
    size_bytes: int
    model: str | None = None
    rotational: bool | None = None
    removable: bool | None = None


@dataclass(frozen=True)
class Nic:
    name: str
    mac: str
    carrier: bool | None = None
    driver: str | None = None
    ipv4: str | None = None


@dataclass(frozen=True)
class Facts:
    kernel: str
    cpus: int
    memory_mb: int
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    vendor: str | None = None
    product: str | None = None

    def summary(self, ip: str | None = None, mac: str | None = None) -> str:
        """One line for a ``booted`` event: ``ip=... mac=... kernel=... cpus=...``."""
        disks = ",".join(f"{d.name}:{_human(d.size_bytes)}" for d in self.disks) or "none"
        words = [
            f"ip={ip or '?'}",
            f"mac={mac or '?'}",
            f"kernel={self.kernel}",
            f"cpus={self.cpus}",
            f"memory_mb={self.memory_mb}",
            f"disks={disks}",
        ]
        return " ".join(words)

    def discovery(self, mac: str) -> dict[str, Any]:
        """The body of ``POST /api/v1/discover``."""
        return {
            "mac": mac,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "disks": [asdict(d) for d in self.disks],
            "nics": [asdict(n) for n in self.nics],
        }


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"  # pragma: no cover


def kernel_release(proc: Path) -> str:
    return read_text(proc / "sys" / "kernel" / "osrelease") or os.uname().release


def cpu_count(proc: Path) -> int:
    text = read_text(proc / "cpuinfo") or ""
    count = sum(1 for line in text.splitlines() if line.split(":")[0].strip() == "processor")
    return count or os.cpu_count() or 1


def memory_mb(proc: Path) -> int:
    for line in (read_text(proc / "meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key == "MemTotal":
            fields = value.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) // 1024
    return 0


def disks(sysfs: Path) -> list[Disk]:
    found = []
    block = sysfs / "block"
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return []
    for name in names:
        if name.startswith(_VIRTUAL_BLOCK):
            continue
        dev = block / name
        sectors = _read_int(dev / "size")
        if not sectors:
            continue
        rotational = _read_int(dev / "queue" / "rotational")
        removable = _read_int(dev / "removable")
        found.append(
            Disk(
                name=name,
                size_bytes=sectors * 512,
                model=read_text(dev / "device" / "model") or None,
                rotational=None if rotational is None else bool(rotational),
                removable=None if removable is None else bool(removable),
            )
        )
    return found


def physical_nics(sysfs: Path) -> list[str]:
    """Names of the NICs backed by a device (no lo, bridges, tunnels), sorted."""
    net = sysfs / "class" / "net"
    try:
        names = sorted(os.listdir(net))
    except OSError:
        return []
    return [n for n in names if n != "lo" and (net / n / "device").exists()]


def nic_mac(sysfs: Path, name: str) -> str:
    return (read_text(sysfs / "class" / "net" / name / "address") or "").lower()


def nic_carrier(sysfs: Path, name: str) -> bool | None:
    """1/0 from sysfs; None while the link is down (the kernel then refuses to say)."""
    value = _read_int(sysfs / "class" / "net" / name / "carrier")
    return None if value is None else value == 1


def nic_driver(sysfs: Path, name: str) -> str | None:
    link = sysfs / "class" / "net" / name / "device" / "driver"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def dmi(sysfs: Path, key: str) -> str | None:
    return read_text(sysfs / "class" / "dmi" / "id" / key) or None
