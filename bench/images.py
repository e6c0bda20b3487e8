"""Benchmark: image build and export times and sizes, and the deploy ramdisk's size.

Builds two bootable Debian 12 images from scratch (debootstrap in a chroot): a minimal
one and one with a few hundred packages; times the build and each export; then builds
the deploy ramdisk. Prints one JSON line per item. Package downloads are cached in
~/.cache/corral-bench so that reruns measure building, not the mirror.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from corral.images.build import BuildSpec, build_image
from corral.images.exports import build_exports
from corral.images.layers import Layer
from corral.images.ramdisk import build_ramdisk
from corral.images.store import ImageStore

CACHE = Path.home() / ".cache" / "corral-bench"
FULL = [
    "build-essential",
    "python3-full",
    "perl",
    "git",
    "vim",
    "gdb",
    "strace",
    "htop",
    "openmpi-bin",
    "libopenmpi-dev",
    "curl",
    "rsync",
    "nfs-common",
    "lvm2",
    "mdadm",
]


def measure(store: ImageStore, name: str, packages: list[str]) -> dict[str, object]:
    staging = store.root / f".bench-{name}"
    start = time.perf_counter()
    # Extra packages go in a layer (apt-get in the chroot): debootstrap's own resolver
    # fails on large --include sets with alternatives.
    layers = [Layer(name=name, packages=packages)] if packages else []
    spec = BuildSpec(
        distro="debian-12", family="debian", release="bookworm", layers=layers, cache_dir=CACHE
    )
    result = build_image(spec, staging)
    built = time.perf_counter() - start
    version = store.add_version(name, result.root, origin="bench", move=True)
    figures: dict[str, object] = {
        "image": name,
        "packages": len(result.packages),
        "build_s": round(built, 1),
        "tree_mb": round(result.size_bytes / 1e6, 1),
    }
    for which in ("stream", "squashfs"):
        t0 = time.perf_counter()
        exports = build_exports(version, which=[which])
        figures[f"{which}_s"] = round(time.perf_counter() - t0, 1)
        figures[f"{which}_mb"] = round(exports[which]["size"] / 1e6, 1)
    return figures


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="corral-bench-images-"))
    try:
        store = ImageStore(work / "images")
        print(json.dumps(measure(store, "minimal", [])), flush=True)
        print(json.dumps(measure(store, "full", FULL)), flush=True)
        t0 = time.perf_counter()
        ramdisk = build_ramdisk(work / "ramdisk", cache=CACHE / "ramdisk")
        print(
            json.dumps(
                {
                    "ramdisk_initrd_mb": round(ramdisk.initrd.stat().st_size / 1e6, 1),
                    "ramdisk_kernel_mb": round(ramdisk.kernel.stat().st_size / 1e6, 1),
                    "ramdisk_build_s": round(time.perf_counter() - t0, 1),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
