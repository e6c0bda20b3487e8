"""The boot files of diskless nodes, on a fake image: which modules go into the appended
archive and where, the load order, the cache, and the errors a node gets instead.

The image's depmod is replaced by a stub (the fake image has no kmod); the real one runs in
tests/integration/test_diskless_boot_files.py.
"""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import pytest

from corral.images.ramdisk import diskless
from corral.images.ramdisk.diskless import DisklessBootError, diskless_boot_files
from corral.images.ramdisk.kernel import select_modules
from corral.images.store import ImageVersion

KVER = "6.1.0-10-amd64"
OLD_KVER = "6.1.0-9-amd64"
MODULES_DEP = """\
kernel/fs/squashfs/squashfs.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/block/loop.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/net/virtio_net.ko: kernel/net/core/failover.ko kernel/drivers/net/net_failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko: kernel/drivers/ptp/ptp.ko
kernel/drivers/ptp/ptp.ko:
kernel/sound/core/snd.ko:
"""
BUILTIN = "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/block/virtio_blk.ko\n"


def make_image(base: Path, modules_dep: str = MODULES_DEP) -> ImageVersion:
    version_dir = base / "img" / "v1"
    rootfs = version_dir / "rootfs"
    (rootfs / "boot").mkdir(parents=True)
    (rootfs / "boot" / f"vmlinuz-{OLD_KVER}").write_bytes(b"old kernel")
    (rootfs / "boot" / f"vmlinuz-{KVER}").write_bytes(b"new kernel")
    moddir = rootfs / "usr" / "lib" / "modules" / KVER
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(modules_dep)
    (moddir / "modules.builtin").write_text(BUILTIN)
    (moddir / "modules.order").write_text("")
    for line in modules_dep.splitlines():
        rel = line.partition(":")[0]
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(f"ELF {rel}".encode())
    (version_dir / "manifest.json").write_text(json.dumps({"name": "img", "version": 1}))
    return ImageVersion.load(version_dir)


@pytest.fixture
def depmod_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The image's depmod, stubbed: writes a modules.dep.bin through BASE/lib/modules."""
    calls: list[str] = []

    def fake(version: ImageVersion, base: Path, kver: str) -> None:
        calls.append(kver)
        (base / "lib" / "modules" / kver / "modules.dep.bin").write_bytes(b"index")

    monkeypatch.setattr(diskless, "_depmod", fake)
    return calls


@pytest.fixture
def image(tmp_path: Path) -> ImageVersion:
    return make_image(tmp_path / "images")


@pytest.fixture
def ramdisk(tmp_path: Path) -> Path:
    path = tmp_path / "ramdisk" / "initrd.img"
    path.parent.mkdir()
    path.write_bytes(b"the deploy ramdisk, zstd'd" * 100 + b"x")  # not 4-byte aligned
    return path


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """``{name: (mode, content)}`` of a newc archive."""
    entries = {}
    pos = 0
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701", header
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        pos = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[pos : pos + size])
        pos += size + (-size % 4)


def appended(initrd: Path, ramdisk: Path) -> dict[str, tuple[int, bytes]]:
    data = initrd.read_bytes()
    prefix = ramdisk.read_bytes()
    assert data.startswith(prefix)
    return read_newc(gzip.decompress(data[len(prefix) :]))


def test_select_modules_takes_dependencies_first_and_skips_builtin_and_absent(
    image: ImageVersion,
) -> None:
    moddir = image.rootfs / "usr/lib/modules" / KVER
    selection = select_modules(
        moddir, KVER, ["ext4", "virtio_pci", "nosuch", "e1000e"], ["ext4", "virtio_pci"]
    )
    assert selection.load == (
        "kernel/lib/crc16.ko",
        "kernel/fs/mbcache.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/ext4/ext4.ko",
    )
    assert selection.files == (
        *selection.load,
        "kernel/drivers/ptp/ptp.ko",
        "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko",
    )
    assert selection.builtin == {"virtio_pci"}
    assert selection.absent == ("nosuch",)


def test_kernel_is_the_image_newest_and_initrd_the_ramdisk_plus_its_modules(
    image: ImageVersion, ramdisk: Path, depmod_calls: list[str]
) -> None:
    kernel, initrd = diskless_boot_files(image, ramdisk)
    assert kernel.read_bytes() == b"new kernel"
    assert depmod_calls == [KVER]
    files = appended(initrd, ramdisk)
    moddir = f"usr/lib/modules/{KVER}"
    # directories 0755 whatever the umask (their entries set the ramdisk's own dirs' mode)
    assert {mode for mode, _ in files.values() if mode & 0o170000 == 0o040000} == {0o040755}
    modules = sorted(n.removeprefix(moddir + "/") for n in files if n.endswith(".ko"))
    # wanted modules and their dependencies; not the others (snd)
    assert modules == sorted(
        [
            "kernel/fs/squashfs/squashfs.ko",
            "kernel/fs/overlayfs/overlay.ko",
            "kernel/drivers/block/loop.ko",
            "kernel/fs/ext4/ext4.ko",
            "kernel/fs/jbd2/jbd2.ko",
            "kernel/fs/mbcache.ko",
            "kernel/lib/crc16.ko",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/net/core/failover.ko",
            "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko",
            "kernel/drivers/ptp/ptp.ko",
        ]
    )
    assert files[f"{moddir}/kernel/fs/ext4/ext4.ko"][1] == b"ELF kernel/fs/ext4/ext4.ko"
    for meta in ("modules.dep.bin", "modules.builtin", "modules.order"):
        assert f"{moddir}/{meta}" in files, meta
    assert not [n for n in files if n.startswith("lib")]  # depmod's link is not packed
    load = files["etc/corral/modules.load"][1].decode().split()
    # boot modules, each after what it needs; NIC drivers (e1000e) load by modalias
    assert load.index("kernel/lib/crc16.ko") < load.index("kernel/fs/ext4/ext4.ko")
    assert load.index("kernel/net/core/failover.ko") < load.index(
        "kernel/drivers/net/virtio_net.ko"
    )
    assert {"kernel/fs/squashfs/squashfs.ko", "kernel/fs/overlayfs/overlay.ko"} <= set(load)
    assert "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko" not in load
    assert kernel.parent.parent == image.exports_dir / "diskless"


def test_built_once_for_many_nodes_and_again_for_a_new_ramdisk(
    image: ImageVersion, ramdisk: Path, depmod_calls: list[str]
) -> None:
    results: list[tuple[Path, Path]] = []
    threads = [
        threading.Thread(target=lambda: results.append(diskless_boot_files(image, ramdisk)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert depmod_calls == [KVER]
    old_initrd = results[0][1]

    ramdisk.write_bytes(b"a new ramdisk")
    (image.exports_dir / "diskless" / ".0123-dead.tmp").mkdir()  # a build that died
    kernel, initrd = diskless_boot_files(image, ramdisk)
    assert len(depmod_calls) == 2
    assert initrd != old_initrd and initrd.read_bytes().startswith(b"a new ramdisk")
    assert not old_initrd.parent.exists()  # the old pair is removed
    kept = sorted(p.name for p in (image.exports_dir / "diskless").iterdir())
    assert kept == sorted([".lock", kernel.parent.name])


def test_image_without_kernel(image: ImageVersion, ramdisk: Path, depmod_calls: list[str]) -> None:
    for path in (image.rootfs / "boot").iterdir():
        path.unlink()
    with pytest.raises(DisklessBootError) as err:
        diskless_boot_files(image, ramdisk)
    assert err.value.message == "image img:1 has no kernel in /boot"
    assert err.value.hint and "linux-image-amd64" in err.value.hint
    assert err.value.http_status == 404
    assert not depmod_calls


def test_no_ramdisk_built(image: ImageVersion, tmp_path: Path) -> None:
    with pytest.raises(DisklessBootError) as err:
        diskless_boot_files(image, tmp_path / "nowhere" / "initrd.img")
    assert err.value.hint == "run 'corral ramdisk build'"


def test_kernel_without_squashfs(tmp_path: Path, ramdisk: Path, depmod_calls: list[str]) -> None:
    dep = "\n".join(line for line in MODULES_DEP.splitlines() if "squashfs" not in line)
    image = make_image(tmp_path / "other", dep + "\n")
    with pytest.raises(DisklessBootError, match="has no squashfs, which a diskless root needs"):
        diskless_boot_files(image, ramdisk)
    assert not (image.exports_dir / "diskless").exists() or not [
        p for p in (image.exports_dir / "diskless").iterdir() if p.name != ".lock"
    ]


def test_kernel_versions_sort_by_number() -> None:
    names = ["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-28-amd64"]
    assert max(names, key=diskless._version_key) == "6.1.0-10-amd64"
