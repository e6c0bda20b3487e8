"""Golden files for the templates of corral.images (corral/images/templates): the files
corral writes into the deploy ramdisk and into the images it builds, for fixed inputs.

Each case writes its files into an empty tree with the code a build uses, and every file it
wrote is compared with tests/golden/images/CASE/ (a path's slashes become "__"). Shell
scripts must pass ``sh -n``. Set CORRAL_UPDATE_GOLDEN=1 to rewrite the golden files after
an intended change, and review the diff.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.images.build.debootstrap import DebootstrapBuilder
from corral.images.build.dnf import DnfBuilder
from corral.images.build.spec import BuildSpec
from corral.images.build.tree import strip_identity, write_file
from corral.images.ramdisk.contents import AGENT_DIR
from corral.images.ramdisk.tree import install_agent
from corral.images.templates import PACKAGED

GOLDEN = Path(__file__).parent.parent / "golden" / "images"


def tree_files(root: Path, leave_out: str | None = None) -> dict[str, str]:
    """The regular files below ``root`` by path (links and directories are not)."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file():
            continue
        if leave_out is not None and relative.startswith(leave_out + "/"):
            continue
        files[relative] = path.read_text()
    return files


def ramdisk(root: Path) -> dict[str, str]:
    """/init, the agent's program and the small files of the ramdisk's /etc; the agent's
    package is copied from the source tree, not rendered."""
    install_agent(root, ["kernel/drivers/virtio/virtio_pci.ko", "kernel/fs/ext4/ext4.ko"])
    return tree_files(root, leave_out=AGENT_DIR)


def debootstrap(root: Path) -> dict[str, str]:
    """The network and SSH configuration of every bootable Debian or Ubuntu image."""
    DebootstrapBuilder.write_config(root)
    return tree_files(root)


def identity(root: Path) -> dict[str, str]:
    """What strip_identity leaves in a tree that had none of it."""
    strip_identity(root)
    return tree_files(root)


def dnf_repo(spec: BuildSpec) -> Callable[[Path], dict[str, str]]:
    def write(root: Path) -> dict[str, str]:
        write_file(root / DnfBuilder.REPO_FILE, DnfBuilder().repo_file(spec))
        return tree_files(root)

    return write


CASES: dict[str, Callable[[Path], dict[str, str]]] = {
    "ramdisk": ramdisk,
    "debootstrap": debootstrap,
    "identity": identity,
    "dnf-fedora": dnf_repo(
        BuildSpec(
            "fedora40",
            "fedora",
            "40",
            mirror="http://mirror.example/fedora/linux/",
            gpg_key="https://mirror.example/fedora/RPM-GPG-KEY-fedora-40-primary",
        )
    ),
    "dnf-rhel": dnf_repo(BuildSpec("rocky9", "rhel", "9", mirror="http://mirror.example/rocky/9")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_match_golden(case: str, tmp_path: Path) -> None:
    files = CASES[case](tmp_path)
    for path, content in files.items():
        if content.startswith("#!/bin/sh\n"):
            check = subprocess.run(
                ["sh", "-n", str(tmp_path / path)], capture_output=True, text=True
            )
            assert check.returncode == 0, f"{case}/{path}: {check.stderr}"
    rendered = {path.replace("/", "__"): content for path, content in files.items()}

    directory = GOLDEN / case
    expected = {p.name for p in directory.iterdir()} if directory.exists() else set()
    if os.environ.get("CORRAL_UPDATE_GOLDEN"):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in expected - set(rendered):
            (directory / stale).unlink()
        for name, content in rendered.items():
            (directory / name).write_text(content)
        return
    assert set(rendered) == expected, "files differ from the golden set"
    for name, content in rendered.items():
        assert content == (directory / name).read_text(), f"{case}/{name} differs from golden"


def test_every_template_has_golden_coverage() -> None:
    """The longest line of each packaged template that Jinja leaves as it is shows up in
    some golden file."""
    golden_text = "".join(p.read_text() for p in GOLDEN.rglob("*") if p.is_file())
    for template in sorted(PACKAGED.glob("*.j2")):
        literal = [
            line
            for line in template.read_text().splitlines()
            if "{{" not in line and "{%" not in line
        ]
        assert literal, f"{template.name} has no line without template syntax"
        assert max(literal, key=len) in golden_text, f"no golden file covers {template.name}"
