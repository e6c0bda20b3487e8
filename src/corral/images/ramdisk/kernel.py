"""The ramdisk's kernel, and of its modules the drivers a deploy needs.

The pieces (:func:`select_modules`, :func:`copy_modules`, :func:`kmod_depmod`) also
serve :mod:`~corral.images.ramdisk.diskless`, which gives the deploy ramdisk the modules
of an image's own kernel.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.images.ramdisk.contents import BOOT_MODULES, NIC_MODULES
from corral.images.ramdisk.errors import RamdiskError
from corral.images.ramdisk.tree import tree_command
from corral.kmod import builtin_modules, load_order, read_modules_dep
from corral.run import run

log = logging.getLogger("corral.images")

#: Files of ``lib/modules/VERSION`` copied as they are (depmod writes the others).
MODULE_METADATA = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


@dataclass(frozen=True)
class ModuleSelection:
    """The modules of one kernel that a ramdisk carries."""

    version: str
    #: Every module copied (the wanted ones and their dependencies), paths relative to
    #: ``lib/modules/VERSION``.
    files: tuple[str, ...]
    #: What /init loads at boot, in order (paths as in ``files``).
    load: tuple[str, ...]
    #: Of the wanted modules, those the kernel has built in.
    builtin: frozenset[str]
    #: Of the wanted modules, those the kernel has neither as a module nor built in.
    absent: tuple[str, ...]


def select_modules(
    moddir: Path, version: str, wanted: Sequence[str], boot: Sequence[str]
) -> ModuleSelection:
    """Of the kernel whose ``modules.dep`` is in ``moddir``: ``wanted`` with their
    dependencies, and of them ``boot`` (a subset) in the order to load them."""
    table = read_modules_dep(moddir)
    builtin = builtin_modules(moddir)
    absent = tuple(m for m in wanted if m not in table and m not in builtin)
    if absent:
        log.info("kernel %s has no %s: left out", version, ", ".join(absent))
    everything = load_order(table, [m for m in wanted if m in table], builtin)
    loaded = load_order(table, [m for m in boot if m in table], builtin)
    return ModuleSelection(
        version=version,
        files=tuple(table[name][0] for name in everything),
        load=tuple(table[name][0] for name in loaded),
        builtin=frozenset(builtin & set(wanted)),
        absent=absent,
    )


def copy_modules(src: Path, dst: Path, selection: ModuleSelection) -> int:
    """Copy the selected modules and the metadata depmod does not write from ``src`` to
    ``dst`` (both ``lib/modules/VERSION`` directories); returns the bytes copied."""
    copied = 0
    for rel in selection.files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
        copied += (dst / rel).stat().st_size
    for meta in MODULE_METADATA:
        if (src / meta).exists():
            shutil.copyfile(src / meta, dst / meta)
    return copied


def kmod_depmod(tool_root: Path, base: Path, version: str) -> None:
    """Index ``base/lib/modules/VERSION`` with the depmod of the kmod in ``tool_root``.

    kmod's modprobe needs the binary indexes (modules.*.bin) only its own depmod writes.
    """
    run([*tree_command(tool_root, "usr/bin/kmod", "depmod"), "-b", str(base), version], timeout=300)


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
    # Debian's kernel packages ship no modules.dep (postinst makes it).
    _depmod(root / "usr" / "bin" / "busybox", kernel_tree, version)
    selection = select_modules(src, version, (*BOOT_MODULES, *NIC_MODULES), BOOT_MODULES)
    copy_modules(src, root / "usr" / "lib" / "modules" / version, selection)
    kmod_depmod(root, root, version)
    log.info(
        "kernel %s: %d modules (%d loaded at boot), %d built in",
        version,
        len(selection.files),
        len(selection.load),
        len(selection.builtin),
    )
    return version, list(selection.load)
