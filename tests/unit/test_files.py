from __future__ import annotations

import os
from pathlib import Path

from corral.files import write_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("old\n")
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["hosts"]


def test_write_atomic_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ipxe"
    write_atomic(path, b"#!ipxe\n")
    assert path.read_bytes() == b"#!ipxe\n"


def test_write_atomic_sets_the_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "exact", "x", 0o644, durable=True)
        write_atomic(tmp_path / "default", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "exact").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "default").stat().st_mode & 0o777 == 0o600  # 0o644 less the umask


def test_write_atomic_does_not_follow_a_link_left_as_its_temporary(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / ".conf.corral-tmp").symlink_to(victim)
    write_atomic(tmp_path / "conf", "secret\n", 0o600)
    assert victim.read_text() == "keep\n"
    assert (tmp_path / "conf").read_text() == "secret\n"
