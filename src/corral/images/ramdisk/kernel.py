"""The ramdisk's kernel, and of its modules the drivers a deploy needs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from corral.images.ramdisk.contents import BOOT_MODULES, NIC_MODULES
from corral.images.ramdisk.errors import RamdiskError
from corral.images.ramdisk.tree import tree_command
from corral.kmod import builtin_modules, load_order, read_modules_dep
from corral.run import run

log = logging.getLogger("corral.images")


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
