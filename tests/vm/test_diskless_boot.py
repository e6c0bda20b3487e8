"""A diskless node's boot files booted for real: qemu (TCG) starts the e2e image's kernel
with the served initrd, given directly (no network, no server), on ``corral.mode=diskless``.

The agent is replaced by a stand-in (a third archive appended to the initrd, as the
token initrd is at a PXE boot) that does what /init expects of the real one: it mounts a
squashfs through a loop device under an overlay at /newroot and exits 0. /init must then
switch_root into it; the new root's init prints what the running kernel has loaded and
powers off. So the test shows the image kernel loading its own modules from the appended
archive (squashfs, overlay, loop), and /init's hand-over.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.cpio import newc_archive
from corral.images.ramdisk import RamdiskResult
from corral.images.ramdisk.diskless import diskless_boot_files, image_kernel_of
from corral.images.ramdisk.tree import AGENT_PROGRAM
from corral.run import run
from tests.integration.test_diskless_boot_files import scratch_version
from tests.vm.test_ramdisk import ramdisk  # noqa: F401  (the fixture: a real, cached build)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="needs squashfs-tools"),
]
BOOT_TIMEOUT = 240

FAKE_AGENT = """#!/bin/sh
# stands in for the agent in diskless mode: the root is a squashfs under an overlay
set -e
mkdir -p /mnt/lower /mnt/rw
mount -t squashfs -o loop,ro /root.squashfs /mnt/lower
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \\
  overlay /newroot
echo "fake-agent: root mounted at /newroot"
"""

NEW_INIT = """#!/bin/busybox sh
bb=/bin/busybox
root=$($bb awk '$2 == "/" {print $3}' /proc/mounts)
echo "DISKLESS-INIT pid=$$ kernel=$($bb uname -r) root=$root"
echo "filesystems: $($bb awk '{print $NF}' /proc/filesystems | $bb tr '\\n' ' ')"
echo "modules: $($bb awk '{print $1}' /proc/modules | $bb tr '\\n' ' ')"
echo "mounted: $($bb awk '{print $2}' /proc/mounts | $bb tr '\\n' ' ')"
$bb poweroff -f
"""


def ramdisk_busybox(initrd: Path, tmp: Path) -> bytes:
    """The ramdisk's static busybox, to be the new root's only program."""
    cpio = tmp / "ramdisk.cpio"
    subprocess.run(["zstd", "-q", "-d", "-f", str(initrd), "-o", str(cpio)], check=True)
    out = tmp / "ramdisk-files"
    out.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "-F", str(cpio), "usr/bin/busybox"], cwd=out, check=True
    )
    return (out / "usr/bin/busybox").read_bytes()


def stand_in_agent(busybox: bytes, tmp: Path) -> bytes:
    """A gzip'd archive replacing the agent, with the squashfs root it mounts."""
    tree = tmp / "newroot"
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp"):
        (tree / d).mkdir(parents=True)
    (tree / "bin/busybox").write_bytes(busybox)
    (tree / "bin/busybox").chmod(0o755)
    (tree / "sbin/init").write_text(NEW_INIT)
    (tree / "sbin/init").chmod(0o755)
    squashfs = tmp / "root.squashfs"
    run(["mksquashfs", str(tree), str(squashfs), "-comp", "gzip", "-all-root", "-noappend",
         "-quiet"], timeout=120)  # fmt: skip
    archive = newc_archive(
        {
            AGENT_PROGRAM: (FAKE_AGENT.encode(), 0o755),
            "root.squashfs": (squashfs.read_bytes(), 0o644),
        }
    )
    return gzip.compress(archive, mtime=0)


def test_image_kernel_loads_its_modules_and_init_switches_root(
    ramdisk: RamdiskResult,  # noqa: F811
    tmp_path: Path,
) -> None:
    version = scratch_version(tmp_path / "images")
    kernel, initrd = diskless_boot_files(version, ramdisk.initrd)
    booted = tmp_path / "initrd-with-agent.img"
    booted.write_bytes(
        initrd.read_bytes() + stand_in_agent(ramdisk_busybox(ramdisk.initrd, tmp_path), tmp_path)
    )
    console = tmp_path / "console.log"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic", "-monitor", "none",
        "-no-reboot", "-nic", "none", "-serial", f"file:{console}",
        "-kernel", str(kernel), "-initrd", str(booted),
        "-append", "console=ttyS0 corral.mode=diskless panic=-1",
    ]  # fmt: skip
    try:
        run(argv, timeout=BOOT_TIMEOUT)
    finally:
        text = console.read_text(errors="replace") if console.exists() else ""
        print(text[-6000:])
    kver = image_kernel_of(version)[0]
    assert f"corral-ramdisk: {kver}, loading drivers" in text
    assert "squashfs: version 4.0" in text  # the image kernel's own module, loaded by /init
    assert "fake-agent: root mounted at /newroot" in text
    assert f"corral-ramdisk: switching to the node's root, {kver}" in text
    match = re.search(r"DISKLESS-INIT pid=(\d+) kernel=(\S+) root=(\S+)", text)
    assert match, "the new root's init did not run"
    assert match.groups() == ("1", kver, "overlay")
    filesystems = re.search(r"filesystems: (.*)", text)
    assert filesystems and {"squashfs", "overlay"} <= set(filesystems.group(1).split())
    modules = re.search(r"modules: (.*)", text)
    assert modules and {"squashfs", "overlay", "loop"} <= set(modules.group(1).split())
    mounted = re.search(r"mounted: (.*)", text)
    assert mounted and {"/", "/dev", "/proc", "/sys", "/run"} <= set(mounted.group(1).split())
