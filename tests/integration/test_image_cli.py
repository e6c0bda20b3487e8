"""`corral image` and `corral layer` through the real entry point, on a tiny busybox tree
(the real debootstrap build is proven in test_image_build.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.images.catalog import image_store
from corral.images.exports import squashfs_chunks
from tests.conftest import corral

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("golden\n")
    return root


def test_import_exec_export_list_show_rm(tmp_path: Path, tree: Path) -> None:
    home = tmp_path / "home"
    assert corral("image", "import", "tiny", str(tree), home=home).returncode == 0
    changed = corral("image", "exec", "tiny", "--", "/bin/sh", "-c", "echo hi > /marker", home=home)
    assert changed.returncode == 0, changed.stderr
    assert "tiny:1 -> tiny:2" in changed.stdout
    store = home / "images" / "tiny"
    assert (store / "v2" / "rootfs" / "marker").read_text() == "hi\n"
    assert not (store / "v1" / "rootfs" / "marker").exists()  # versions are immutable
    # The chroot's /proc was unmounted before the tree became a version.
    proc = store / "v2" / "rootfs" / "proc"
    assert not proc.exists() or not any(proc.iterdir())
    exported = corral("image", "export", "tiny:2", home=home)
    assert exported.returncode == 0, exported.stderr
    assert "export stream" in exported.stdout and "export squashfs" in exported.stdout
    squashfs = home / "tiny.squashfs"  # what a diskless node mounts: the chunks joined
    squashfs.write_bytes(
        b"".join(p.read_bytes() for p in squashfs_chunks(image_store(home).get_ref("tiny:2")))
    )
    listing = subprocess.run(
        ["unsquashfs", "-l", str(squashfs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "squashfs-root/marker" in listing
    assert "tiny:2" in corral("image", "list", home=home).stdout
    shown = corral("image", "show", "tiny:2", home=home).stdout
    assert "exec: /bin/sh -c echo hi > /marker on v1" in shown
    assert corral("image", "rm", "tiny:1", home=home).returncode == 0
    assert "tiny:1" not in corral("image", "list", home=home).stdout


def test_tarball_import_and_layers(tmp_path: Path, tree: Path) -> None:
    home = tmp_path / "home"
    tarball = tmp_path / "t.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(tree), "."], check=True)
    assert corral("image", "import", "fromtar", str(tarball), home=home).returncode == 0
    overlay = tmp_path / "overlay" / "etc"
    overlay.mkdir(parents=True)
    (overlay / "motd").write_text("gpu node\n")
    added = corral(
        "layer",
        "add",
        "gpu",
        "--package",
        "nvidia-smi",
        "--overlay",
        str(overlay.parent),
        home=home,
    )
    assert added.returncode == 0, added.stderr
    assert "nvidia-smi" in corral("layer", "show", "gpu", home=home).stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["image", "build", "x", "--distro", "beos-5"], "unknown distro 'beos-5'"),
        (
            ["image", "build", "x", "--distro", "debian-12", "--layer", "nope"],
            "unknown layer 'nope'",
        ),
        (["image", "show", "ghost"], "ghost"),
        (["image", "import", "Bad Name", "/nonexistent"], ""),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    result = corral(*argv, home=tmp_path / "home")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr
