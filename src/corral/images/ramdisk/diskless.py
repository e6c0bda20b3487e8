"""Boot files of diskless nodes: the image's own kernel, and the deploy ramdisk made to
run on it.

A diskless node boots the kernel of its image, so that the image's systemd later finds the
modules of the running kernel under its own ``/usr/lib/modules``. The deploy ramdisk is
built for Debian's kernel, whose modules do not load into another one: the node's initrd is
the ramdisk's ``initrd.img`` followed by a second archive, of the image kernel's modules
(the deploy ramdisk's drivers, :data:`DISKLESS_MODULES`, their dependencies and depmod's
indexes) and an ``etc/corral/modules.load`` for that kernel. The kernel unpacks both
archives in turn, the second's files over the first's, and the ramdisk's ``/init`` loads
the modules of ``uname -r``.

The pair is built on first use and kept in the image version's exports, under a key of
its inputs (the image version, its kernel, the ramdisk's bytes, this code), so a new
ramdisk or a change here makes a new pair and the old one is removed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from corral import cpio, kmod
from corral.cpio import CpioWriter
from corral.images.ramdisk import contents, kernel, tree
from corral.images.ramdisk.contents import BOOT_MODULES, DISKLESS_MODULES, LIB_DIRS, NIC_MODULES
from corral.images.ramdisk.errors import RamdiskError
from corral.images.ramdisk.kernel import ModuleSelection, copy_modules, kmod_depmod, select_modules
from corral.images.ramdisk.tree import MODULES_LOAD
from corral.images.store import ImageVersion, flocked

log = logging.getLogger("corral.images")

#: Bump when the layout of the files changes in a way the key's inputs do not show.
FORMAT_VERSION = "1"

#: Where in an image version's exports the boot files are kept.
EXPORT_DIR = "diskless"

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"

#: gzip, not zstd, for the appended archive: the kernel finds a gzip stream at any
#: offset, and level 6 packs the modules in about a second.
GZIP_LEVEL = 6


class DisklessBootError(RamdiskError):
    """A diskless node's boot files cannot be made: no kernel in its image, no ramdisk."""

    http_status = 404  # what the node asked for does not exist (yet)


def diskless_boot_files(version: ImageVersion, ramdisk_initrd: Path) -> tuple[Path, Path]:
    """The kernel and initrd a diskless node of image ``version`` boots, built on first
    use (once, whoever else asks meanwhile) from the deploy ramdisk's ``ramdisk_initrd``."""
    if not ramdisk_initrd.is_file():
        raise DisklessBootError(
            f"no deploy ramdisk at {ramdisk_initrd}", "run 'corral ramdisk build'"
        )
    kver, image_kernel = image_kernel_of(version)
    moddir = _module_dir(version, kver)
    key = _key(version, image_kernel, moddir, ramdisk_initrd)
    base = version.exports_dir / EXPORT_DIR
    built = base / key
    if not (built / INITRD_NAME).exists():
        with flocked(base / ".lock"):
            if not (built / INITRD_NAME).exists():
                _build(version, kver, image_kernel, moddir, ramdisk_initrd, built)
                _forget_others(base, keep=key)
    return built / KERNEL_NAME, built / INITRD_NAME


# -- the image's kernel ---------------------------------------------------------------


def _version_key(text: str) -> tuple[tuple[int, str], ...]:
    """``6.1.0-10-amd64`` sorts before ``6.1.0-9-amd64`` as text, after it here."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", text))


def image_kernel_of(version: ImageVersion) -> tuple[str, Path]:
    """The kernel version and file of the image's ``/boot/vmlinuz-*`` (the newest of
    several)."""
    found = {
        p.name.removeprefix("vmlinuz-"): p
        for p in (version.rootfs / "boot").glob("vmlinuz-*")
        if p.is_file() and not p.is_symlink()  # a link could lead out of the image
    }
    if not found:
        raise DisklessBootError(
            f"image {version.ref} has no kernel in /boot",
            f"build it with a kernel package: 'corral image build {version.name} ... "
            "--package linux-image-amd64'",
        )
    kver = max(found, key=_version_key)
    if len(found) > 1:
        log.info(
            "image %s has %d kernels (%s): diskless nodes boot the newest, %s",
            version.ref,
            len(found),
            ", ".join(sorted(found, key=_version_key)),
            kver,
        )
    return kver, found[kver]


def _module_dir(version: ImageVersion, kver: str) -> Path:
    for rel in ("usr/lib/modules", "lib/modules"):
        moddir = version.rootfs / rel / kver
        if (moddir / "modules.dep").is_file():
            return moddir
    raise DisklessBootError(
        f"image {version.ref} has kernel {kver} but no /usr/lib/modules/{kver}/modules.dep",
        "rebuild the image (its kernel package's postinst runs depmod)",
    )


# -- the cache key --------------------------------------------------------------------

_digests: dict[tuple[str, int, int, int], str] = {}
_digests_lock = threading.Lock()


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered while its size, mtime and inode stay the same (the
    ramdisk's 40 MB are hashed once, not once per node that boots)."""
    st = path.stat()
    ident = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _digests_lock:
        known = _digests.get(ident)
    if known is None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known = digest.hexdigest()
        with _digests_lock:
            _digests[ident] = known
    return known


def _code_files() -> list[Path]:
    """The code that decides what the appended archive holds."""
    return [Path(m.__file__ or "") for m in (contents, kernel, tree, kmod, cpio)] + [Path(__file__)]


def _key(version: ImageVersion, image_kernel: Path, moddir: Path, ramdisk_initrd: Path) -> str:
    digest = hashlib.sha256()
    parts = [
        FORMAT_VERSION,
        version.ref,
        str(version.path),
        _file_digest(image_kernel),
        _file_digest(moddir / "modules.dep"),
        _file_digest(ramdisk_initrd),
        *(_file_digest(p) for p in _code_files()),
    ]
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


# -- building -------------------------------------------------------------------------


def _build(
    version: ImageVersion,
    kver: str,
    image_kernel: Path,
    moddir: Path,
    ramdisk_initrd: Path,
    built: Path,
) -> None:
    started = time.monotonic()
    built.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{built.name}-", suffix=".tmp", dir=built.parent))
    try:
        selection = select_modules(
            moddir,
            kver,
            (*BOOT_MODULES, *DISKLESS_MODULES, *NIC_MODULES),
            (*BOOT_MODULES, *DISKLESS_MODULES),
        )
        missing = [m for m in DISKLESS_MODULES if m in selection.absent]
        if missing:
            raise DisklessBootError(
                f"the kernel {kver} of image {version.ref} has no {', '.join(missing)}, "
                "which a diskless root needs"
            )
        archive = staging / "modules.cpio.gz"
        modules_size = _write_modules_archive(version, moddir, selection, staging, archive)
        shutil.copyfile(image_kernel, staging / KERNEL_NAME)
        with (staging / INITRD_NAME).open("wb") as out:
            for part in (ramdisk_initrd, archive):
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        archive_size = archive.stat().st_size
        archive.unlink()
        seconds = round(time.monotonic() - started, 1)
        manifest = {
            "image": version.ref,
            "kernel_version": kver,
            "modules": len(selection.files),
            "loaded_at_boot": len(selection.load),
            "modules_size": modules_size,
            "archive_size": archive_size,
            "ramdisk_size": ramdisk_initrd.stat().st_size,
            "build_seconds": seconds,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        os.chmod(staging, 0o755)
        staging.rename(built)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "diskless boot files of image %s: kernel %s (%.1f MB), initrd %.1f MB = ramdisk "
        "%.1f MB + %d modules (%.1f MB, %.1f MB compressed, %d loaded at boot); "
        "built in %.1f s",
        version.ref,
        kver,
        (built / KERNEL_NAME).stat().st_size / 1e6,
        (built / INITRD_NAME).stat().st_size / 1e6,
        ramdisk_initrd.stat().st_size / 1e6,
        len(selection.files),
        modules_size / 1e6,
        archive_size / 1e6,
        len(selection.load),
        seconds,
    )


def _write_modules_archive(
    version: ImageVersion, moddir: Path, selection: ModuleSelection, staging: Path, out: Path
) -> int:
    """Write the gzip'd newc archive of the selected modules, depmod's indexes and the
    load list; return the modules' size."""
    root = staging / "root"
    dst = root / "usr" / "lib" / "modules" / selection.version
    size = copy_modules(moddir, dst, selection)
    (root / "lib").symlink_to("usr/lib")  # depmod -b reads BASE/lib/modules
    _depmod(version, root, selection.version)
    (root / "lib").unlink()
    load = root / MODULES_LOAD
    load.parent.mkdir(parents=True, exist_ok=True)
    load.write_text("".join(f"{m}\n" for m in selection.load))
    with (
        out.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz,
    ):
        writer = CpioWriter(gz)
        # Files only (their directories made 0755): an entry for a directory the ramdisk
        # has already would change its mode.
        for path in tree.walk_files(root):
            writer.file(path.relative_to(root).as_posix(), path.read_bytes())
        writer.finish()
    shutil.rmtree(root)
    return size


def _depmod(version: ImageVersion, base: Path, kver: str) -> None:
    """depmod with the image's own kmod: the one that matches its kernel, and the server
    needs none (it runs through the image's loader and libraries, without chroot)."""
    rootfs = version.rootfs
    if not (rootfs / "usr/bin/kmod").is_file():
        raise DisklessBootError(
            f"image {version.ref} has no /usr/bin/kmod: corral runs the image's own depmod "
            "to index its kernel's modules",
            f"build it with the kmod package: 'corral image build {version.name} ... "
            "--package kmod'",
        )
    if not (rootfs / LIB_DIRS[0] / "ld-linux-x86-64.so.2").is_file():
        raise DisklessBootError(
            f"image {version.ref} has no /{LIB_DIRS[0]}/ld-linux-x86-64.so.2: corral runs "
            "the image's depmod through it, which only Debian-family images have for now"
        )
    kmod_depmod(rootfs, base, kver)


def _forget_others(base: Path, keep: str) -> None:
    """Remove the boot files of older keys (a node downloading one keeps its open file)
    and what a build that died left; called under the lock, so no build is running."""
    for old in base.iterdir():
        if not old.is_dir() or old.name == keep:
            continue
        if not old.name.startswith("."):
            log.info("removing old diskless boot files %s", old)
        shutil.rmtree(old, ignore_errors=True)
