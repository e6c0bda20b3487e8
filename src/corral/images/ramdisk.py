"""The deploy ramdisk: a Debian kernel and an initramfs that runs corral's node agent.

:func:`build_ramdisk` takes every part from Debian packages of the machine's apt sources
(or of ``mirror``):

- the kernel that ``linux-image-amd64`` depends on today (the generic flavour: the
  cloud one lacks the NIC and storage drivers of physical servers), and of its modules
  only the drivers a deploy needs (:data:`BOOT_MODULES`, :data:`NIC_MODULES`) with their
  dependencies;
- the tools of :data:`PACKAGES` and the shared libraries they link, unpacked with
  ``dpkg-deb -x`` (no maintainer scripts run, and the tree's programs that the build
  runs go through the tree's own dynamic loader: no chroot), after apt resolved their
  dependencies against an empty system. Packages that only maintainer
  scripts or unused programs need (:data:`LEFT_OUT`) are declared installed instead;
- of Python, the interpreter and the modules the agent imports (found by
  :mod:`modulefinder`), the agent itself in ``/usr/lib/corral-agent``.

It then prunes what a ramdisk never reads (documentation, locales, unused libraries:
every program's ``DT_NEEDED`` is checked, so a missing library fails the build rather than
the boot), writes ``/init`` (a busybox script), packs a ``newc`` cpio and compresses it
with zstd. The result is cached under ``cache`` by a key of every input (package versions,
agent sources, this module's layout), so an unchanged second build costs one apt
resolution (about 2 s) and a copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import modulefinder
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.cpio import CpioWriter
from corral.errors import CorralError, InvalidValue
from corral.kmod import builtin_modules, load_order, read_modules_dep
from corral.run import run

log = logging.getLogger("corral.images")

#: Bump when the ramdisk's layout changes in a way the inputs of the cache key do not show.
FORMAT_VERSION = "1"

KERNEL_METAPACKAGE = "linux-image-amd64"

#: What the ramdisk is made of (their dependencies come along).
PACKAGES: tuple[str, ...] = (
    "busybox-static",  # sh, udhcpc, ip, mount, wget...: the userland
    "kmod",  # modprobe, depmod
    "python3-minimal",  # the agent's interpreter
    "libpython3-stdlib",  # json, http.client, email... (pruned to what the agent imports)
    "udpcast",  # udp-receiver: multicast image transfer
    "rsync",
    "aria2",  # aria2c: BitTorrent image transfer
    "fdisk",  # sfdisk
    "gdisk",  # sgdisk
    "e2fsprogs",  # mkfs.ext4
    "xfsprogs",  # mkfs.xfs
    "dosfstools",  # mkfs.vfat for EFI system partitions
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",  # grub-install
    "tar",  # GNU tar: the image stream keeps xattrs and ACLs (busybox tar drops them)
    "zstd",  # zstd -d: the image stream is zstd-compressed
    "util-linux",  # partx, mkswap -U (busybox's mkswap cannot set a UUID)
    "python3-libtorrent",  # libtorrent: the agent's BitTorrent receiver (receivers.bittorrent)
)

#: Dependencies declared but not needed in a ramdisk: maintainer-script tooling, the
#: full python3 (xfs_scrub_all), data files. apt is told they are installed already.
LEFT_OUT: tuple[str, ...] = (
    "debconf",
    "debianutils",
    "dmsetup",
    "dpkg",
    "init-system-helpers",
    "initramfs-tools",
    "linux-base",
    "media-types",
    "mime-support",
    "perl",
    "perl-base",
    "python3",
    "python3.11",
    "readline-common",
    "tzdata",
    "usr-is-merged",
    "usrmerge",
)

#: Python modules of Debian packages (``/usr/lib/python3/dist-packages``) that the
#: ramdisk keeps, each with the standard-library modules it imports itself (a compiled
#: module's imports are invisible to :mod:`modulefinder`). The agent imports them by
#: name, lazily; the build fails if one does not import with the ramdisk's Python.
DIST_PACKAGES: dict[str, tuple[str, ...]] = {
    "libtorrent": ("datetime",),  # the binding converts times to datetime objects
}

DIST_PACKAGES_DIR = "usr/lib/python3/dist-packages"

#: Programs the ramdisk must have (paths inside it); the build fails without one.
REQUIRED_TOOLS: tuple[str, ...] = (
    "usr/bin/busybox",
    "usr/bin/python3",
    "usr/bin/udp-receiver",
    "usr/bin/rsync",
    "usr/bin/aria2c",
    "usr/sbin/sfdisk",
    "usr/sbin/sgdisk",
    "usr/sbin/mkfs.ext4",
    "usr/sbin/mkfs.xfs",
    "usr/sbin/mkfs.vfat",
    "usr/sbin/grub-install",
    "usr/bin/tar",
    "usr/bin/zstd",
    "usr/bin/partx",
    "usr/sbin/mkswap",
    "usr/sbin/modprobe",
    "usr/bin/corral-agent",
    "init",
)

#: Modules /init loads at every boot: virtio, disks, file systems.
BOOT_MODULES: tuple[str, ...] = (
    # ext4, jbd2 and xfs ask the crypto API for "crc32c" (a soft dependency, not in
    # modules.dep): the generic kernel has it as modules, the cloud one built in
    "crc32c_intel",
    "crc32c_generic",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    "ahci",
    "ata_piix",
    "xfs",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "efivarfs",
)

#: NIC and storage drivers for real machines, loaded at boot by PCI modalias when their
#: hardware is present. Those the kernel flavour lacks are logged and skipped.
NIC_MODULES: tuple[str, ...] = (
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "ixgbevf",
    "i40e",
    "ice",
    "bnxt_en",
    "tg3",
    "r8169",
    "mlx4_en",
    "mlx5_core",
    "ena",
    "gve",
    "vmxnet3",
    "hv_netvsc",
    "hv_storvsc",
    "megaraid_sas",
    "mpt3sas",
    "smartpqi",
    "hpsa",
)

#: Standard-library modules kept besides those the agent imports: the codecs Python
#: looks up by name at run time.
EXTRA_STDLIB: tuple[str, ...] = (
    "encodings.aliases",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "runpy",
)

#: Standard-library modules that :mod:`modulefinder` would follow from the agent's imports
#: (through functions the agent never calls) but that the agent does not need. The build
#: runs the agent's code in the pruned tree to prove it (:func:`smoke_test`).
STDLIB_EXCLUDES: tuple[str, ...] = (
    "asyncio",
    "bz2",
    "concurrent",
    "ctypes",
    "curses",
    "dbm",
    "decimal",
    "_pydecimal",
    "doctest",
    "ensurepip",
    "fractions",
    "http.cookiejar",
    "http.server",
    "idlelib",
    "importlib.metadata",
    "importlib.resources",
    "lib2to3",
    "lzma",
    "multiprocessing",
    "pdb",
    "pydoc",
    "pydoc_data",
    "sqlite3",
    "statistics",
    "tarfile",
    "test",
    "tkinter",
    "unittest",
    "venv",
    "webbrowser",
    "xmlrpc",
    "zipfile",
)

#: Removed from the tree after unpacking (globs relative to its root).
PRUNE: tuple[str, ...] = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/menu",
    "usr/share/common-licenses",
    "usr/share/gdb",
    "usr/share/python3",
    "usr/share/initramfs-tools",
    "usr/share/aria2",
    "usr/share/apport",
    "usr/share/applications",
    "usr/share/binfmts",
    "usr/share/doc-base",
    "usr/share/gcc",
    "usr/share/java",
    "usr/share/maven-repo",
    "usr/share/pixmaps",
    "usr/include",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/pkgconfig",
    "usr/lib/x86_64-linux-gnu/**/*.a",
    "usr/lib/systemd",
    "usr/lib/udev",
    "usr/lib/cron.d",
    "usr/lib/tmpfiles.d",
    "usr/libexec/e2fsprogs",
    "etc/cron.*",
    "etc/init.d",
    "etc/logrotate.d",
    "etc/systemd",
    "etc/bash_completion.d",
    "var/lib/*",
    "var/cache/*",
    # GRUB programs a deploy does not run (the rescue-image makers, FUSE mount, ...).
    "usr/bin/grub-fstest",
    "usr/bin/grub-mount",
    "usr/bin/grub-mkrescue",
    "usr/bin/grub-mkstandalone",
    "usr/bin/grub-mknetdir",
    "usr/bin/grub-glue-efi",
    "usr/bin/grub-render-label",
    "usr/bin/grub-syslinux2cfg",
    "usr/bin/grub-kbdcomp",
    "usr/bin/grub-menulst2cfg",
    "usr/bin/grub-mklayout",
    "usr/bin/grub-mkfont",
    "usr/sbin/grub-macbless",
    "usr/sbin/grub-sparc64-setup",
    "usr/sbin/grub-ofpathname",
    # Prebuilt EFI images for network and signed boot: grub-install makes its own.
    "usr/lib/grub/x86_64-efi/monolithic",
    # xfsprogs' online scrubber (needs the full python3 and ICU collation).
    "usr/sbin/xfs_scrub",
    "usr/sbin/xfs_scrub_all",
)

#: Libraries programs load with dlopen() (no DT_NEEDED names them): always kept.
DLOPENED = re.compile(r"^(libgcc_s\.so.*|libnss_(files|dns)\.so.*|libresolv\.so.*|ld-linux.*)$")

#: zstd level for the initramfs (the kernel unpacks zstd quickly even in TCG).
ZSTD_LEVEL = 19

#: Built ramdisks kept in the cache (older ones are deleted after a build).
KEEP_BUILDS = 3

AGENT_DIR = "usr/lib/corral-agent"

MULTIARCH = "x86_64-linux-gnu"
LIB_DIRS = (f"usr/lib/{MULTIARCH}", "usr/lib", "usr/lib64")

INIT_SCRIPT = r"""#!/bin/sh
# corral deploy ramdisk: mount the kernel's file systems, load drivers, run the agent.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/log /var/tmp
mount -t devpts -o nosuid,noexec,gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
chmod 1777 /tmp /var/tmp
echo "corral-ramdisk: $(uname -r), loading drivers" > /dev/kmsg

kver=$(uname -r)
while read -r ko; do
  [ -n "$ko" ] && insmod "/lib/modules/$kver/$ko" 2>/dev/null
done < /etc/corral/modules.load
# Drivers of the PCI devices present (real NICs, RAID controllers).
for alias in /sys/bus/pci/devices/*/modalias; do
  [ -r "$alias" ] && modprobe -q -b "$(cat "$alias")" 2>/dev/null
done
[ -d /sys/firmware/efi/efivars ] && mount -t efivarfs efivarfs /sys/firmware/efi/efivars
hostname corral-ramdisk

echo "corral-ramdisk: starting the agent" > /dev/kmsg
/usr/bin/corral-agent
echo "corral-ramdisk: the agent exited ($?); a shell on the console"
while :; do
  setsid cttyhack sh -l
  sleep 1
done
"""

AGENT_WRAPPER = f"""#!/bin/sh
# corral's node agent (python3 -m corral.agent): the standard library, and the Debian
# modules the ramdisk keeps (no site.py: dist-packages is on the path by name).
PYTHONPATH=/{AGENT_DIR}:/{DIST_PACKAGES_DIR} exec python3 -S -m corral.agent "$@"
"""

AGENT_PACKAGE_INIT = '"""corral, as much of it as the deploy ramdisk carries: the agent."""\n'


class RamdiskError(CorralError):
    """The ramdisk could not be built."""


@dataclass(frozen=True)
class RamdiskResult:
    kernel: Path
    initrd: Path
    kernel_version: str
    kernel_size: int
    initrd_size: int
    #: Size of the unpacked initramfs (the cpio archive).
    initrd_unpacked_size: int
    #: Seconds the build took; the original build's, when it came from the cache.
    build_seconds: float
    cached: bool
    packages: tuple[str, ...]
    key: str


# --- apt -------------------------------------------------------------------------------


def debian_suite() -> str:
    """The codename of the machine's Debian release (``bookworm``)."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    return "bookworm"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str

    @property
    def filename(self) -> str:
        # apt's name for a downloaded package; an epoch's ':' becomes '%3a'.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) .*\[([^\]]+)\]\)")


class Apt:
    """apt-get and apt-cache on a private, empty package status in ``state``.

    Packages resolve as for an empty system, so every dependency is downloaded (into
    ``archives``, which keeps them between builds). With ``mirror``, the package lists
    come from that mirror into ``state/lists`` too, instead of the machine's apt sources.
    """

    def __init__(self, state: Path, archives: Path, mirror: str | None = None) -> None:
        self.state = state
        self.archives = archives
        self.mirror = mirror.rstrip("/") if mirror else None
        self.status = state / "status"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        if not self.status.exists():
            self.status.write_text("")

    def options(self) -> list[str]:
        opts = {
            "Dir::State::status": str(self.status),
            "Dir::Cache::archives": str(self.archives),
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "APT::Sandbox::User": "root",
            "Acquire::Retries": "3",
        }
        if self.mirror:
            opts["Dir::Etc::SourceList"] = str(self.state / "sources.list")
            opts["Dir::Etc::SourceParts"] = str(self.state / "sources.list.d")
            opts["Dir::State::Lists"] = str(self.state / "lists")
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def update(self, max_age: float = 86400.0) -> None:
        """With a mirror: fetch its package lists (at most once per ``max_age`` seconds)."""
        if not self.mirror:
            return
        suite = debian_suite()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        lines = [
            f"deb [signed-by={keyring}] {self.mirror} {s} main" for s in (suite, f"{suite}-updates")
        ]
        sources = self.state / "sources.list"
        text = "\n".join(lines) + "\n"
        lists = self.state / "lists"
        stamp = self.state / "lists.stamp"
        fresh = (
            sources.exists()
            and sources.read_text() == text
            and stamp.exists()
            and time.time() - stamp.stat().st_mtime < max_age
        )
        if fresh:
            return
        sources.write_text(text)
        (self.state / "sources.list.d").mkdir(exist_ok=True)
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        log.info("fetching package lists from %s (%s)", self.mirror, suite)
        run(["apt-get", "-q", *self.options(), "update"], timeout=600)
        stamp.write_text(f"{time.time()}\n")

    def show(self, names: Iterable[str]) -> list[dict[str, str]]:
        """The candidate stanzas of ``names``; unknown names are skipped."""
        out = run(["apt-cache", *self.options(), "show", "--no-all-versions", *names], check=False)
        stanzas = []
        for block in out.stdout.split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(" ") and key not in fields:
                    fields[key] = value.strip()
            if "Package" in fields:
                stanzas.append(fields)
        return stanzas

    def depends(self, package: str) -> str:
        """The (first real) package that metapackage ``package`` depends on."""
        out = run(["apt-cache", *self.options(), "depends", package], check=False)
        for line in out.stdout.splitlines():
            m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
            if m and not m.group(1).startswith("<"):
                return m.group(1)
        raise RamdiskError(
            f"cannot find the package {package} depends on",
            "run 'apt-get update' (apt-cache says: " + (out.stderr.strip() or "nothing") + ")",
        )

    def declare_installed(self, names: Iterable[str]) -> None:
        """Make apt believe ``names`` are installed: they satisfy dependencies, but are not
        downloaded. Fields come from the candidates, so version constraints hold."""
        self.status.write_text("")
        entries = []
        for fields in self.show(names):
            entry = [
                f"Package: {fields['Package']}",
                "Status: install ok installed",
                f"Version: {fields['Version']}",
                f"Architecture: {fields.get('Architecture', 'all')}",
                "Maintainer: corral <corral@localhost>",
                "Description: left out of the corral ramdisk",
            ]
            for key in ("Multi-Arch", "Provides", "Essential"):
                if key in fields:
                    entry.append(f"{key}: {fields[key]}")
            entries.append("\n".join(entry) + "\n")
        self.status.write_text("\n".join(entries))

    def resolve(self, packages: Sequence[str]) -> list[Package]:
        """What ``apt-get install packages`` would install on this empty system."""
        out = run(["apt-get", "-q", *self.options(), "-s", "install", *packages], check=False)
        if out.returncode != 0:
            raise RamdiskError(
                "apt cannot resolve the ramdisk's packages: "
                + " | ".join(out.stderr.strip().splitlines()[-4:]),
                "check the names given with --add-package; run 'apt-get update'",
            )
        found = []
        for line in out.stdout.splitlines():
            m = _INST.match(line)
            if m:
                found.append(Package(m.group(1), m.group(2), m.group(3)))
        if not found:
            raise RamdiskError("apt resolved no packages:\n" + out.stdout[-1000:])
        return found

    def download(self, packages: Sequence[Package]) -> list[Path]:
        """The .deb files of ``packages`` in the archives directory (downloaded if missing)."""
        missing = [p for p in packages if not (self.archives / p.filename).exists()]
        if missing:
            log.info("downloading %d packages", len(missing))
            run(
                [
                    "apt-get",
                    "-q",
                    "-y",
                    *self.options(),
                    "--download-only",
                    "install",
                    *(f"{p.name}={p.version}" for p in missing),
                ],
                timeout=1800,
            )
        debs = [self.archives / p.filename for p in packages]
        lost = [d.name for d in debs if not d.exists()]
        if lost:
            raise RamdiskError(f"apt did not download {', '.join(lost)}")
        return debs


# --- ELF: which shared libraries a program needs ---------------------------------------


def elf_needed(path: Path) -> list[str] | None:
    """The ``DT_NEEDED`` names of a 64-bit little-endian ELF file; None if not one."""
    try:
        with path.open("rb") as f:
            if f.read(6) != b"\x7fELF\x02\x01":
                return None
            data = f.read()
    except OSError:
        return None
    data = b"\x7fELF\x02\x01" + data
    try:
        phoff = struct.unpack_from("<Q", data, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        loads: list[tuple[int, int, int]] = []
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", data, phoff + i * phentsize
            )
            if p_type == 1:  # PT_LOAD
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []
        needed: list[int] = []
        strtab = None
        for j in range(dynamic[1] // 16):
            tag, value = struct.unpack_from("<qQ", data, dynamic[0] + 16 * j)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                needed.append(value)
            elif tag == 5:  # DT_STRTAB (an address)
                strtab = value
        if strtab is None:
            return []
        for vaddr, offset, size in loads:
            if vaddr <= strtab < vaddr + size:
                strtab = strtab - vaddr + offset
                break
        names = []
        for off in needed:
            end = data.index(b"\0", strtab + off)
            names.append(data[strtab + off : end].decode())
        return names
    except (struct.error, ValueError):
        return None


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _find_library(root: Path, name: str) -> Path | None:
    for d in LIB_DIRS:
        candidate = root / d / name
        if candidate.exists():
            return candidate
    return None


def prune_libraries(root: Path) -> tuple[list[str], int]:
    """Remove shared libraries no program of the tree needs; return them and bytes freed.

    Raises :class:`RamdiskError` if a program needs a library the tree lacks.
    """
    lib_dir = root / LIB_DIRS[0]
    libs = {p for p in lib_dir.iterdir() if ".so" in p.name} if lib_dir.is_dir() else set()
    roots = [
        p
        for p in _walk_files(root)
        if not p.is_symlink() and p.parent != lib_dir and elf_needed(p) is not None
    ]
    keep: set[Path] = {p for p in libs if DLOPENED.match(p.name)}
    missing: dict[str, set[str]] = {}
    todo = list(roots) + [p.resolve() for p in keep if p.exists()]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in elf_needed(path) or []:
            found = _find_library(root, name)
            if found is None:
                missing.setdefault(name, set()).add(str(path.relative_to(root)))
                continue
            keep.add(found)
            real = found.resolve()
            keep.add(real)
            todo.append(real)
    if missing:
        detail = "; ".join(f"{lib} (for {', '.join(sorted(u)[:3])})" for lib, u in missing.items())
        raise RamdiskError(f"the ramdisk lacks shared libraries: {detail}")
    removed, freed = [], 0
    kept_real = {k.resolve() for k in keep}
    for lib in sorted(libs):
        if lib in keep or lib.resolve() in kept_real:
            continue
        freed += lib.lstat().st_size
        removed.append(lib.name)
        lib.unlink()
    return removed, freed


# --- Python ----------------------------------------------------------------------------


def stdlib_dir(root: Path) -> Path:
    found = sorted((root / "usr" / "lib").glob("python3.*"))
    found = [p for p in found if (p / "os.py").exists()]
    if not found:
        raise RamdiskError("no Python standard library in the ramdisk (python3-minimal?)")
    return found[-1]


def agent_source() -> Path:
    """The ``corral/agent`` package this build copies into the ramdisk."""
    return Path(__file__).resolve().parent.parent / "agent"


def _receiver_modules() -> tuple[str, ...]:
    """The modules of every receiver the agent has (its registry imports them all, so
    :mod:`modulefinder` follows them too: this only makes sure of it)."""
    from corral.agent.receivers import RECEIVERS

    return tuple(sorted({cls.__module__ for cls in RECEIVERS.values()}))


def _dist_packages_imports() -> list[str]:
    return sorted({m for imports in DIST_PACKAGES.values() for m in imports})


def prune_dist_packages(root: Path) -> int:
    """Delete the Debian Python modules of the tree but those of :data:`DIST_PACKAGES`
    (their metadata too); return the bytes freed."""
    top = root / "usr" / "lib" / "python3"
    if not top.is_dir():
        return 0
    kept_dir = root / DIST_PACKAGES_DIR

    def kept(entry: Path) -> bool:
        # a package directory, or a module file: libtorrent.cpython-311-x86_64-linux-gnu.so
        # (not libtorrent.egg-info)
        if entry.parent != kept_dir:
            return False
        if entry.is_dir():
            return entry.name in DIST_PACKAGES
        name, _, _ = entry.name.partition(".")
        return name in DIST_PACKAGES and entry.suffix in (".py", ".so")

    freed = 0
    for dirpath, dirnames, filenames in os.walk(top, topdown=True):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not kept(here / d)]
        for name in filenames:
            path = here / name
            if not kept(path):
                freed += path.lstat().st_size
                path.unlink()
    for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    return freed


def needed_stdlib(stdlib: Path, agent_root: Path) -> set[Path]:
    """Files of ``stdlib`` that running the agent can import, found statically."""
    dynload = stdlib / "lib-dynload"
    finder = modulefinder.ModuleFinder(
        path=[str(agent_root), str(stdlib), str(dynload)], excludes=list(STDLIB_EXCLUDES)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write("import corral.agent.__main__\n")
        # every receiver's module, whatever the registry's imports look like
        script.write("".join(f"import {m}\n" for m in _receiver_modules()))
        script.write("".join(f"import {m}\n" for m in EXTRA_STDLIB))
        script.write("".join(f"import {m}\n" for m in _dist_packages_imports()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            finder.run_script(script.name)
    finally:
        os.unlink(script.name)
    keep: set[Path] = set()
    for module in finder.modules.values():
        file: str | None = getattr(module, "__file__", None)
        if file and Path(file).is_relative_to(stdlib):
            keep.add(Path(file))
    return keep


def prune_stdlib(stdlib: Path, keep: set[Path]) -> int:
    """Delete every file of ``stdlib`` not in ``keep`` (and emptied directories)."""
    freed = 0
    for path in list(_walk_files(stdlib)):
        if path not in keep and path.name != "os.py":  # os.py: the prefix landmark
            freed += path.lstat().st_size
            path.unlink()
    for dirpath, _, _ in sorted(os.walk(stdlib), key=lambda t: -len(t[0])):
        if dirpath != str(stdlib) and not os.listdir(dirpath):
            os.rmdir(dirpath)
    (stdlib / "lib-dynload").mkdir(exist_ok=True)  # exec_prefix landmark
    return freed


SMOKE_TEST = r"""
import io, json, socket, sys, threading
from corral.agent.cmdline import BootOrders
from corral.agent.main import Agent, Settings
from corral.agent.facts import Facts

# A one-shot HTTP server: the agent's report goes through http.client and email parsing.
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
seen = []

def serve():
    conn, _ = listener.accept()
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    seen.append(data)
    body = b'{"ok": true}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    conn.close()

thread = threading.Thread(target=serve, daemon=True)
thread.start()
port = listener.getsockname()[1]
orders = BootOrders.from_cmdline(f"corral.server=http://127.0.0.1:{port} corral.node=smoke")
agent = Agent(orders, settings=Settings(tries=1))
assert agent.report("booted", Facts("k", 1, 1).summary("10.0.0.1", "52:54:00:00:00:01"))
thread.join(5)
assert b'"phase": "booted"' in seen[0], seen
print("corral-agent smoke test: ok", sys.version.split()[0])
"""


def tree_command(root: Path, program: str, argv0: str | None = None) -> list[str]:
    """argv that runs ``program`` (a path inside the tree) on this machine without chroot:
    through the tree's own dynamic loader and libraries."""
    libdir = root / LIB_DIRS[0]
    argv = [str(libdir / "ld-linux-x86-64.so.2"), "--library-path", str(libdir)]
    if argv0:
        argv += ["--argv0", argv0]
    return [*argv, str(root / program)]


def _tree_python(root: Path, stdlib: Path) -> tuple[list[str], dict[str, str]]:
    argv = tree_command(root, f"usr/bin/{stdlib.name}")
    path = os.pathsep.join(str(root / d) for d in (AGENT_DIR, DIST_PACKAGES_DIR))
    env = {"PYTHONHOME": str(root / "usr"), "PYTHONPATH": path}
    return [*argv, "-S", "-B"], env


#: Compiles every .py under the given directories into unchecked-hash .pyc files, with the
#: tree's own interpreter (so magic number and cache tag match) and only builtin modules.
COMPILE_SCRIPT = r"""
import importlib._bootstrap_external as bootstrap, importlib.util, os, sys
root, dirs = sys.argv[1], sys.argv[2:]
count = 0
for top in dirs:
    for dirpath, _, files in os.walk(top):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                source = f.read()
            shown = "/" + os.path.relpath(path, root)
            code = compile(source, shown, "exec", dont_inherit=True)
            data = bootstrap._code_to_hash_pyc(code, importlib.util.source_hash(source), False)
            cache = importlib.util.cache_from_source(path)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "wb") as f:
                f.write(data)
            count += 1
print(count)
"""


def precompile(root: Path, stdlib: Path) -> int:
    """Byte-compile the kept standard library and the agent; returns the number of files.

    Measured under TCG: the agent reaches its report about 2.5 s sooner with .pyc files
    (they add about 1.2 MB to the compressed initramfs). Unchecked-hash .pyc files are
    valid whatever the files' times in the unpacked archive.
    """
    argv, env = _tree_python(root, stdlib)
    out = run([*argv, "-c", COMPILE_SCRIPT, str(root), str(stdlib), str(root / AGENT_DIR)], env=env)
    return int(out.stdout.strip() or 0)


def smoke_test(root: Path, stdlib: Path) -> None:
    """Run the agent's code with the pruned standard library: imports, argparse, a report
    over HTTP to a local socket, and the import of every module of :data:`DIST_PACKAGES`.
    Raises :class:`RamdiskError` if anything is missing."""
    argv, env = _tree_python(root, stdlib)
    imports = "".join(f"import {m}\n" for m in DIST_PACKAGES)
    checks = (["-m", "corral.agent", "--help"], ["-c", SMOKE_TEST], ["-c", imports])
    for args in ([*argv, *check] for check in checks):
        out = run(args, env=env, check=False, timeout=120)
        if out.returncode != 0:
            raise RamdiskError(
                "the agent does not run with the ramdisk's Python: "
                + " | ".join((out.stderr or out.stdout).strip().splitlines()[-4:]),
                "a module it imports is pruned: add it to EXTRA_STDLIB (or to its entry in "
                "DIST_PACKAGES)",
            )


# --- kernel modules --------------------------------------------------------------------


def _depmod(busybox: Path, base: Path, version: str) -> None:
    run([str(busybox), "depmod", "-b", str(base), version], timeout=300)


def install_kernel(kernel_tree: Path, root: Path, out: Path) -> tuple[str, list[str]]:
    """Copy the kernel to ``out/vmlinuz`` and the wanted modules into ``root``.

    Returns the kernel version and the modules /init loads at boot, in order.
    """
    kernels = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RamdiskError(f"expected one boot/vmlinuz-* in the kernel package: {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    config = kernel_tree / "boot" / f"config-{version}"
    if config.exists() and "CONFIG_RD_ZSTD=y" not in config.read_text():
        raise RamdiskError(f"kernel {version} cannot unpack a zstd initramfs (no CONFIG_RD_ZSTD)")
    shutil.copyfile(kernels[0], out / "vmlinuz")
    src = kernel_tree / "lib" / "modules" / version
    busybox = root / "usr" / "bin" / "busybox"
    _depmod(busybox, kernel_tree, version)
    table = read_modules_dep(src)
    builtin = builtin_modules(src)
    wanted = (*BOOT_MODULES, *NIC_MODULES)
    absent = [m for m in wanted if m not in table and m not in builtin]
    if absent:
        log.info("kernel %s has no %s: left out", version, ", ".join(absent))
    present = [m for m in wanted if m in table]
    boot = load_order(table, [m for m in BOOT_MODULES if m in table], builtin)
    everything = load_order(table, present, builtin)
    dst = root / "usr" / "lib" / "modules" / version
    for name in everything:
        rel = table[name][0]
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src / meta).exists():
            shutil.copyfile(src / meta, dst / meta)
    # kmod's modprobe needs the binary indexes (modules.*.bin) only its own depmod writes.
    run([*tree_command(root, "usr/bin/kmod", "depmod"), "-b", str(root), version], timeout=300)
    log.info(
        "kernel %s: %d modules (%d loaded at boot), %d built in",
        version,
        len(everything),
        len(boot),
        len(builtin & set(wanted)),
    )
    return version, [table[name][0] for name in boot]


# --- the tree --------------------------------------------------------------------------


def merge_usr(root: Path) -> None:
    """Debian's merged /usr: /bin, /sbin, /lib* become symlinks into /usr."""
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top, usr = root / name, root / "usr" / name
        if top.is_symlink():
            continue
        if top.is_dir():
            usr.mkdir(parents=True, exist_ok=True)
            for entry in sorted(top.iterdir()):
                target = usr / entry.name
                if target.is_dir() and entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, target, symlinks=True, dirs_exist_ok=True)
                    shutil.rmtree(entry)
                else:
                    if target.exists() or target.is_symlink():
                        if target.is_dir() and not target.is_symlink():
                            shutil.rmtree(target)
                        else:
                            target.unlink()
                    entry.rename(target)
            top.rmdir()
        if usr.exists():
            top.symlink_to(f"usr/{name}")


def prune(root: Path, patterns: Iterable[str]) -> int:
    freed = 0
    for pattern in patterns:
        for path in sorted(root.glob(pattern), reverse=True):
            if path.is_dir() and not path.is_symlink():
                freed += sum(f.lstat().st_size for f in _walk_files(path))
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                freed += path.lstat().st_size
                path.unlink()
    return freed


def install_busybox_links(root: Path) -> int:
    """Symlink every busybox applet that no real program of the tree provides."""
    busybox = root / "usr" / "bin" / "busybox"
    out = run([str(busybox), "--list-full"])
    made = 0
    for rel in out.stdout.split():
        rel = rel.strip("/")
        head, _, rest = rel.partition("/")
        if head in ("bin", "sbin"):
            rel = f"usr/{head}/{rest}"
        path = root / rel
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to("/usr/bin/busybox")
        made += 1
    return made


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def install_agent(root: Path, boot_modules: Sequence[str]) -> None:
    pkg = root / AGENT_DIR / "corral"
    shutil.copytree(
        agent_source(), pkg / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    _write(pkg / "__init__.py", AGENT_PACKAGE_INIT)
    _write(root / "usr" / "bin" / "corral-agent", AGENT_WRAPPER, 0o755)
    _write(root / "init", INIT_SCRIPT, 0o755)
    _write(root / "etc" / "corral" / "modules.load", "".join(f"{m}\n" for m in boot_modules))
    _write(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(root / "etc" / "group", "root:x:0:\ntty:x:5:\ndisk:x:6:\n")
    _write(root / "etc" / "hostname", "corral-ramdisk\n")
    _write(
        root / "etc" / "profile",
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='corral-ramdisk# '\n",
    )
    _write(root / "etc" / "os-release", 'NAME="corral deploy ramdisk"\nID=corral-ramdisk\n')
    mtab = root / "etc" / "mtab"
    if not mtab.is_symlink():
        mtab.unlink(missing_ok=True)
        mtab.symlink_to("/proc/self/mounts")
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "var/log", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)


def check_tools(root: Path) -> None:
    """Every program of :data:`REQUIRED_TOOLS` is there and executable."""
    absent = []
    for rel in REQUIRED_TOOLS:
        path = root / rel
        target = path
        # Absolute symlinks point into the ramdisk, not into the build machine.
        for _ in range(10):
            if not target.is_symlink():
                break
            link = os.readlink(target)
            target = root / link.lstrip("/") if link.startswith("/") else target.parent / link
        if not (target.is_file() and os.access(target, os.X_OK)):
            absent.append(rel)
    if absent:
        raise RamdiskError(f"the ramdisk lacks {', '.join(absent)}")


def pack(root: Path, cpio: Path) -> int:
    """Write ``root`` as a newc archive plus ``/dev/console``; return its size."""
    with cpio.open("wb") as out:
        writer = CpioWriter(out)
        writer.tree(root)
        # The kernel opens /dev/console for /init before anything mounts devtmpfs.
        writer.entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        writer.finish()
        return writer.size


# --- building --------------------------------------------------------------------------


def _hash_tree(digest: hashlib._Hash, root: Path) -> None:
    for path in _walk_files(root):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")


def cache_key(packages: Sequence[Package], kernel: Package) -> str:
    digest = hashlib.sha256()
    parts = [
        FORMAT_VERSION,
        kernel.filename,
        *sorted(p.filename for p in packages),
        INIT_SCRIPT,
        AGENT_WRAPPER,
        ",".join(BOOT_MODULES),
        ",".join(NIC_MODULES),
        ",".join(EXTRA_STDLIB),
        json.dumps(DIST_PACKAGES, sort_keys=True),
        ",".join(STDLIB_EXCLUDES),
        ",".join(PRUNE),
        str(ZSTD_LEVEL),
        Path(__file__).read_text(),
    ]
    for part in parts:
        digest.update(part.encode() + b"\0")
    _hash_tree(digest, agent_source())
    return digest.hexdigest()[:20]


def _extract(deb: Path, into: Path) -> None:
    run(["dpkg-deb", "-x", str(deb), str(into)], timeout=600)


def _build(
    staging: Path, apt: Apt, packages: Sequence[Package], kernel: Package
) -> dict[str, object]:
    started = time.monotonic()
    debs = apt.download([*packages, kernel])
    root = staging / "root"
    root.mkdir()
    log.info("unpacking %d packages", len(packages))
    for deb in debs[:-1]:
        _extract(deb, root)
    merge_usr(root)
    kernel_tree = staging / "kernel"
    _extract(debs[-1], kernel_tree)
    version, boot_modules = install_kernel(kernel_tree, root, staging)
    shutil.rmtree(kernel_tree)

    log.info("pruning")
    freed = prune(root, PRUNE) + prune_dist_packages(root)
    install_agent(root, boot_modules)
    stdlib = stdlib_dir(root)
    keep = needed_stdlib(stdlib, root / AGENT_DIR)
    freed_py = prune_stdlib(stdlib, keep)
    compiled = precompile(root, stdlib)
    smoke_test(root, stdlib)
    links = install_busybox_links(root)
    removed, freed_libs = prune_libraries(root)
    log.info(
        "pruned %.1f MB of files, %.1f MB of Python (kept %d modules), %d unused libraries "
        "(%.1f MB); %d busybox applets linked, %d Python files compiled",
        freed / 1e6,
        freed_py / 1e6,
        len(keep),
        len(removed),
        freed_libs / 1e6,
        links,
        compiled,
    )
    check_tools(root)

    cpio = staging / "initrd.cpio"
    log.info("packing the initramfs")
    unpacked = pack(root, cpio)
    shutil.rmtree(root)
    log.info("compressing %.1f MB with zstd -%d", unpacked / 1e6, ZSTD_LEVEL)
    run(
        [
            "zstd",
            "-q",
            f"-{ZSTD_LEVEL}",
            "-T0",
            "--rm",
            str(cpio),
            "-o",
            str(staging / "initrd.img"),
        ],
        timeout=1800,
    )
    return {
        "kernel_version": version,
        "initrd_unpacked_size": unpacked,
        "build_seconds": round(time.monotonic() - started, 1),
        "packages": [p.filename for p in packages],
        "kernel_package": kernel.filename,
    }


def _forget_old_builds(cache: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent ramdisks of the cache."""
    builds = sorted(
        (p for p in cache.glob("ramdisk-*") if (p / "manifest.json").exists()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[keep:]:
        log.info("removing old ramdisk %s from the cache", old.name)
        shutil.rmtree(old, ignore_errors=True)


def _install(built: Path, dest: Path) -> tuple[Path, Path]:
    """Copy ``vmlinuz`` and ``initrd.img`` into ``dest``, each replaced atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    result = []
    for name in ("vmlinuz", "initrd.img"):
        tmp = dest / f".{name}.tmp"
        shutil.copyfile(built / name, tmp)
        os.replace(tmp, dest / name)
        result.append(dest / name)
    return result[0], result[1]


def build_ramdisk(
    dest: Path,
    *,
    cache: Path,
    extra_packages: Sequence[str] = (),
    mirror: str | None = None,
    kernel_metapackage: str = KERNEL_METAPACKAGE,
) -> RamdiskResult:
    """Build (or take from ``cache``) the deploy ramdisk; put ``vmlinuz`` and
    ``initrd.img`` into ``dest``.

    ``extra_packages`` are added with their dependencies. ``mirror`` (a Debian archive
    URL) replaces the machine's apt sources. ``kernel_metapackage`` picks the kernel
    flavour: the default, generic one boots physical servers (e1000e, igb, ixgbe, i40e,
    ice, mlx5, bnxt, tg3, ahci, nvme, megaraid_sas, mpt3sas), the cloud one
    (``linux-image-cloud-amd64``) only VMs and clouds.
    """
    for name in extra_packages:
        if not _PACKAGE_NAME.match(name):
            raise InvalidValue(f"'{name}' is not a Debian package name")
    if mirror is not None and not re.match(r"^(https?|file):/", mirror):
        raise InvalidValue(f"bad mirror '{mirror}': expected an http://, https:// or file:/ URL")
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "zstd"):
        if shutil.which(tool) is None:
            raise RamdiskError(
                f"{tool} not found", "run 'make setup' (apt-get install apt dpkg zstd)"
            )
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "lock"):
        return _build_or_reuse(dest, cache, extra_packages, mirror, kernel_metapackage)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time per cache (they share apt's state and the package archive)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_or_reuse(
    dest: Path,
    cache: Path,
    extra_packages: Sequence[str],
    mirror: str | None,
    kernel_metapackage: str,
) -> RamdiskResult:
    apt = Apt(cache / "apt", cache / "debs", mirror)
    apt.update()
    wanted = [*PACKAGES, *extra_packages]
    left_out = [p for p in LEFT_OUT if p not in extra_packages]
    log.info("resolving %d packages (+%d extra)", len(PACKAGES), len(extra_packages))
    apt.declare_installed(left_out)
    kernel_name = apt.depends(kernel_metapackage)
    resolved = apt.resolve([*wanted, kernel_name])
    kernel = next((p for p in resolved if p.name == kernel_name), None)
    if kernel is None:
        raise RamdiskError(f"apt did not resolve the kernel package {kernel_name}")
    # apt may "upgrade" a package declared installed when something depends on it (the
    # declared one lacks the archive version's fields): those stay out all the same.
    skip = {kernel_name, kernel_metapackage, *left_out}
    packages = [p for p in resolved if p.name not in skip]
    key = cache_key(packages, kernel)
    built = cache / f"ramdisk-{key}"
    manifest_path = built / "manifest.json"
    cached = manifest_path.exists()
    if cached:
        log.info("ramdisk %s is in the cache (%s)", key, built)
        os.utime(built)  # recently used: kept by _forget_old_builds
    else:
        log.info("building ramdisk %s: kernel %s, %d packages", key, kernel.filename, len(packages))
        staging = Path(tempfile.mkdtemp(prefix="ramdisk-", suffix=".tmp", dir=cache))
        try:
            manifest = _build(staging, apt, packages, kernel)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            try:
                staging.rename(built)
            except OSError:
                if not manifest_path.exists():  # not built meanwhile by another process
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _forget_old_builds(cache, keep=KEEP_BUILDS)
    manifest = json.loads(manifest_path.read_text())
    kernel_path, initrd_path = _install(built, dest)
    result = RamdiskResult(
        kernel=kernel_path,
        initrd=initrd_path,
        kernel_version=str(manifest["kernel_version"]),
        kernel_size=kernel_path.stat().st_size,
        initrd_size=initrd_path.stat().st_size,
        initrd_unpacked_size=int(manifest["initrd_unpacked_size"]),
        build_seconds=float(manifest["build_seconds"]),
        cached=cached,
        packages=tuple(str(p) for p in manifest["packages"]),
        key=key,
    )
    log.info(
        "ramdisk: kernel %s (%.1f MB), initrd %.1f MB (%.1f MB unpacked)%s",
        result.kernel_version,
        result.kernel_size / 1e6,
        result.initrd_size / 1e6,
        result.initrd_unpacked_size / 1e6,
        " from the cache" if cached else f", built in {result.build_seconds:.0f} s",
    )
    return result
