"""The boot files of diskless nodes from the real e2e image (Debian 12, corral-built) and a
real deploy ramdisk: the image's kernel, the ramdisk followed by that kernel's modules (kmod
depmod run from the image), served over HTTP and TFTP to a diskless node and refused with
the reason to others.

The image is the one the VM install tests build and cache (built here if it is not yet);
the test reads it in place and writes the boot files into a scratch version directory.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.images.catalog import image_store
from corral.images.ramdisk import RamdiskResult
from corral.images.ramdisk.diskless import diskless_boot_files, image_kernel_of
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.inventory.clusterfile import apply_cluster, load_cluster
from corral.kmod import builtin_modules
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.unit.test_diskless_initrd import read_newc
from tests.vm.installing import IMAGE, built_image
from tests.vm.test_ramdisk import ramdisk  # noqa: F401  (the fixture: a real, cached build)

# heavy: the image build, when nothing cached it yet
pytestmark = [pytest.mark.integration, pytest.mark.heavy]

CLUSTER = f"""
profiles:
  - {{name: dl, image: {IMAGE}}}
nodes:
  - {{name: dl1, install_method: diskless, profiles: [dl],
     interfaces: [{{mac: "52:54:00:00:0d:01", ip: 10.0.0.51}}]}}
  - {{name: img1, install_method: image, profiles: [dl],
     interfaces: [{{mac: "52:54:00:00:0d:02", ip: 10.0.0.52}}]}}
  - {{name: bare1, install_method: diskless,
     interfaces: [{{mac: "52:54:00:00:0d:03", ip: 10.0.0.53}}]}}
"""


def scratch_version(images: Path) -> ImageVersion:
    """A version of image e2e under ``images`` whose rootfs is the cached image's."""
    cached = built_image() / IMAGE / "v1"
    version = images / IMAGE / "v1"
    version.mkdir(parents=True)
    manifest = json.loads((cached / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps(manifest))
    (version / "rootfs").symlink_to(cached / "rootfs")
    return ImageVersion.load(version)


def test_kernel_is_the_image_s_and_initrd_the_ramdisk_plus_its_modules(
    ramdisk: RamdiskResult,  # noqa: F811
    tmp_path: Path,
) -> None:
    version = scratch_version(tmp_path / "images")
    kver, image_kernel = image_kernel_of(version)
    started = time.monotonic()
    kernel, initrd = diskless_boot_files(version, ramdisk.initrd)
    first = time.monotonic() - started
    started = time.monotonic()
    assert diskless_boot_files(version, ramdisk.initrd) == (kernel, initrd)
    again = time.monotonic() - started

    assert kernel.read_bytes() == image_kernel.read_bytes()
    data = initrd.read_bytes()
    ramdisk_bytes = ramdisk.initrd.read_bytes()
    assert data.startswith(ramdisk_bytes)
    files = read_newc(gzip.decompress(data[len(ramdisk_bytes) :]))
    moddir = f"usr/lib/modules/{kver}"
    builtin = builtin_modules(version.rootfs / "usr/lib/modules" / kver)
    load = files["etc/corral/modules.load"][1].decode().split()
    for name, rel in (
        ("squashfs", "kernel/fs/squashfs/squashfs.ko"),
        ("overlay", "kernel/fs/overlayfs/overlay.ko"),
        ("loop", "kernel/drivers/block/loop.ko"),
    ):
        assert name in builtin or (f"{moddir}/{rel}" in files and rel in load), name
    for index in ("modules.dep", "modules.dep.bin", "modules.alias.bin", "modules.builtin"):
        assert f"{moddir}/{index}" in files, index
    assert all(f"{moddir}/{rel}" in files for rel in load)
    print(
        f"image kernel {kver} (ramdisk's {ramdisk.kernel_version}): kernel "
        f"{kernel.stat().st_size / 1e6:.1f} MB, initrd {len(data) / 1e6:.1f} MB = ramdisk "
        f"{len(ramdisk_bytes) / 1e6:.1f} MB + {(len(data) - len(ramdisk_bytes)) / 1e6:.1f} MB "
        f"({len([n for n in files if n.endswith('.ko')])} modules, {len(load)} loaded at boot); "
        f"built in {first:.1f} s, {again * 1000:.0f} ms when cached"
    )


@pytest.fixture
def served(
    fixture_cluster: None,
    settings: Settings,
    ramdisk: RamdiskResult,  # noqa: F811
) -> Iterator[tuple[BootService, TestClient]]:
    with db.inventory() as inventory:
        apply_cluster(inventory, load_cluster(CLUSTER, "diskless"))
    scratch_version(settings.home / "images")
    settings.ramdisk.mkdir(parents=True)
    for built in (ramdisk.kernel, ramdisk.initrd):
        (settings.ramdisk / built.name).symlink_to(built)
    service = BootService(settings, db.engine())
    with TestClient(create_app(service, "admin-secret"), client=("10.0.0.51", 40000)) as client:
        yield service, client


def test_served_to_a_diskless_node_and_refused_with_the_reason_to_others(
    served: tuple[BootService, TestClient], settings: Settings
) -> None:
    service, client = served
    version = image_store(settings.home).get_ref(IMAGE)
    kernel, initrd = diskless_boot_files(version, settings.ramdisk / "initrd.img")
    got = client.get("/corral/diskless/dl1/vmlinuz")
    assert got.status_code == 200 and got.content == kernel.read_bytes()
    got = client.get("/corral/diskless/dl1/initrd.img")
    assert got.status_code == 200 and got.content == initrd.read_bytes()
    assert service.tftp_resolve("corral/diskless/dl1/vmlinuz", "10.0.0.51") == kernel.read_bytes()

    refused = client.get("/corral/diskless/img1/initrd.img")
    assert refused.status_code == 404
    assert refused.json() == {
        "detail": "node img1 is not diskless (install method image)",
        "hint": "make it so with 'corral node set img1 --install-method diskless'",
    }
    refused = client.get("/corral/diskless/bare1/vmlinuz")
    assert refused.status_code == 404
    assert refused.json()["detail"] == "diskless node bare1 has no image"
    assert client.get("/corral/diskless/nosuch/vmlinuz").status_code == 404
    assert client.get("/corral/diskless/dl1/System.map").status_code == 404
    assert service.tftp_resolve("corral/diskless/img1/vmlinuz", "10.0.0.52") is None

    for name in ("vmlinuz", "initrd.img"):
        (settings.ramdisk / name).unlink()
    refused = client.get("/corral/diskless/dl1/initrd.img")
    assert refused.status_code == 404
    assert refused.json()["hint"] == "run 'corral ramdisk build'"
