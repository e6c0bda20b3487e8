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
agent sources, this package's code), so an unchanged second build costs one apt
resolution (about 2 s) and a copy.

The modules of this package: :mod:`~corral.images.ramdisk.contents` (what the ramdisk is
made of: packages, drivers, modules, what is pruned), :mod:`~corral.images.ramdisk.apt`
(resolving and downloading packages), :mod:`~corral.images.ramdisk.kernel`,
:mod:`~corral.images.ramdisk.python` (the agent's interpreter and standard library),
:mod:`~corral.images.ramdisk.elf` (the shared libraries programs need),
:mod:`~corral.images.ramdisk.tree` (the unpacked tree and its files); this one builds and
caches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidValue
from corral.images.ramdisk.apt import PACKAGE_NAME, Apt, Package
from corral.images.ramdisk.contents import (
    AGENT_DIR,
    BOOT_MODULES,
    DIST_PACKAGES,
    EXTRA_STDLIB,
    KERNEL_METAPACKAGE,
    LEFT_OUT,
    NIC_MODULES,
    PACKAGES,
    PRUNE,
    STDLIB_EXCLUDES,
    ZSTD_LEVEL,
)
from corral.images.ramdisk.elf import prune_libraries
from corral.images.ramdisk.errors import RamdiskError
from corral.images.ramdisk.kernel import install_kernel
from corral.images.ramdisk.python import (
    needed_stdlib,
    precompile,
    prune_dist_packages,
    prune_stdlib,
    smoke_test,
    stdlib_dir,
)
from corral.images.ramdisk.tree import (
    agent_source,
    agent_wrapper,
    check_tools,
    init_script,
    install_agent,
    install_busybox_links,
    merge_usr,
    pack,
    prune,
    walk_files,
)
from corral.run import run

log = logging.getLogger("corral.images")

#: Bump when the ramdisk's layout changes in a way the inputs of the cache key do not show.
FORMAT_VERSION = "1"

#: Built ramdisks kept in the cache (older ones are deleted after a build).
KEEP_BUILDS = 3


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


def _hash_tree(digest: hashlib._Hash, root: Path, leave_out: tuple[str, ...] = ()) -> None:
    for path in walk_files(root):
        if "__pycache__" in path.parts or path.suffix == ".pyc" or path.name in leave_out:
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")


def cache_key(packages: Sequence[Package], kernel: Package) -> str:
    digest = hashlib.sha256()
    parts = [
        FORMAT_VERSION,
        kernel.filename,
        *sorted(p.filename for p in packages),
        init_script(),
        agent_wrapper(),
        ",".join(BOOT_MODULES),
        ",".join(NIC_MODULES),
        ",".join(EXTRA_STDLIB),
        json.dumps(DIST_PACKAGES, sort_keys=True),
        ",".join(STDLIB_EXCLUDES),
        ",".join(PRUNE),
        str(ZSTD_LEVEL),
    ]
    for part in parts:
        digest.update(part.encode() + b"\0")
    # this package's code, but for the diskless boot files, which are made after it
    _hash_tree(digest, Path(__file__).parent, leave_out=("diskless.py",))
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
        if not PACKAGE_NAME.match(name):
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
