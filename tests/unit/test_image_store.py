"""The image store: numbered immutable versions, manifests, names, imports, atomic adds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from corral.errors import InvalidValue, NotFound, UsageError
from corral.images import store as store_module
from corral.images.store import (
    ImageError,
    ImageNotFound,
    ImageStore,
    InvalidImageName,
    UnsafeTarball,
    check_name,
    parse_dpkg_status,
    parse_ref,
)

DPKG_STATUS = """\
Package: adduser
Status: install ok installed
Priority: important
Architecture: all
Version: 3.134
Description: add and remove users and groups
 This package includes the 'adduser' and 'deluser' commands.
 .
 Version: 9.9 (a continuation line, not a field)

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u14

Package: old-thing
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1

Package: zlib1g
Status: install ok installed
Architecture: amd64
Version: 1:1.2.13.dfsg-1
"""


def make_tree(root: Path, text: str = "hello") -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(text + "\n")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\n" + b"x" * 1000)
    tool.chmod(0o755)
    os.link(tool, root / "usr" / "bin" / "tool2")
    (root / "bin").symlink_to("usr/bin")
    (root / "var" / "lib" / "dpkg").mkdir(parents=True)
    (root / "var" / "lib" / "dpkg" / "status").write_text(DPKG_STATUS)
    return root


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


def leftovers(store: ImageStore) -> list[str]:
    """Temporary directories anywhere in the store."""
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*.tmp-*"))


# -- names and references ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "a", "0", "rocky9.4", "web_front-2", "a" * 63])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Base", "-x", ".x", "_x", "a/b", "a b", "a:b", "ä", "a" * 64, "../x"]
)
def test_invalid_names(store: ImageStore, src: Path, name: str) -> None:
    with pytest.raises(InvalidImageName, match="invalid image name") as err:
        store.add_version(name, src, origin="test")
    assert "\n" not in str(err.value)
    assert isinstance(err.value, InvalidValue) and err.value.exit_code == 2
    assert not store.root.exists() or not any(store.root.glob("*/v*"))


def test_parse_ref() -> None:
    assert parse_ref("base:3") == ("base", 3)
    assert parse_ref("base:v3") == ("base", 3)
    assert parse_ref("base") == ("base", None)
    assert parse_ref("base:latest") == ("base", None)
    for bad in ("base:0", "base:x", "base:-1", "Base:1", ":3", "base:3:4", "base:٣"):
        with pytest.raises(InvalidImageName):
            parse_ref(bad)


# -- versions ------------------------------------------------------------------------------


def test_versions_increment_and_link_to_their_parent(store: ImageStore, src: Path) -> None:
    v1 = store.add_version("base", src, origin="debootstrap bookworm")
    v2 = store.add_version("base", src, origin="exec v1: apt-get install vim")
    other = store.add_version("web", src, origin="import /x")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.manifest["parent"] is None and v2.manifest["parent"] == 1
    assert v2.path == store.root / "base" / "v2" and v2.rootfs == v2.path / "rootfs"
    assert (v2.path / "exports").is_dir()
    assert store.get("base").version == 2
    assert store.get("base", 1) == v1
    assert store.get_ref("base:1").manifest["origin"] == "debootstrap bookworm"
    assert [v.ref for v in store.versions("base")] == ["base:1", "base:2"]
    assert [v.ref for v in store.list()] == ["base:1", "base:2", "web:1"]
    assert store.names() == ["base", "web"]
    assert leftovers(store) == []


def test_a_new_version_leaves_the_old_one_alone(store: ImageStore, src: Path) -> None:
    v1 = store.add_version("base", src, origin="one")
    (src / "etc" / "hostname").write_text("changed\n")
    (src / "usr" / "bin" / "tool").write_bytes(b"new")  # also the hard link's content
    (src / "etc" / "new").write_text("new\n")
    v2 = store.add_version("base", src, origin="two")
    assert (v1.rootfs / "etc" / "hostname").read_text() == "hello\n"
    assert (v1.rootfs / "usr" / "bin" / "tool2").read_bytes().startswith(b"#!/bin/sh")
    assert not (v1.rootfs / "etc" / "new").exists()
    assert (v2.rootfs / "etc" / "hostname").read_text() == "changed\n"
    # the copy is a copy: nothing shared with the source or between versions
    assert (v1.rootfs / "etc/hostname").stat().st_ino != (src / "etc/hostname").stat().st_ino
    tool = v2.rootfs / "usr" / "bin" / "tool"
    assert tool.stat().st_ino == (v2.rootfs / "usr" / "bin" / "tool2").stat().st_ino
    assert (v2.rootfs / "bin").readlink() == Path("usr/bin")


def test_move_takes_the_tree(store: ImageStore, tmp_path: Path) -> None:
    staging = make_tree(tmp_path / "staging")
    inode = (staging / "etc" / "hostname").stat().st_ino
    v1 = store.add_version("base", staging, origin="debootstrap bookworm", move=True)
    assert not staging.exists()
    assert (v1.rootfs / "etc" / "hostname").stat().st_ino == inode


def test_manifest(store: ImageStore, src: Path) -> None:
    v = store.add_version("base", src, origin="capture n001")
    on_disk = json.loads((v.path / "manifest.json").read_text())
    assert on_disk == v.manifest
    m = v.manifest
    assert (m["name"], m["version"], m["origin"], m["parent"]) == ("base", 1, "capture n001", None)
    assert m["exports"] == {}
    assert len(m["created"]) == 20 and m["created"].endswith("Z")
    # hostname 6 + tool 1010 (its hard link once) + status + the symlink "usr/bin" (7)
    assert m["size_bytes"] == 6 + 1010 + len(DPKG_STATUS) + 7
    assert m["file_count"] == 5  # hostname, tool, tool2, bin, status
    assert m["packages"] == ["adduser=3.134", "libc6=2.36-9+deb12u14", "zlib1g=1:1.2.13.dfsg-1"]


def test_dpkg_status_parsing() -> None:
    assert parse_dpkg_status(DPKG_STATUS) == [
        "adduser=3.134",
        "libc6=2.36-9+deb12u14",
        "zlib1g=1:1.2.13.dfsg-1",
    ]
    assert parse_dpkg_status("") == []


def test_no_package_database_means_no_packages(store: ImageStore, tmp_path: Path) -> None:
    tree = tmp_path / "plain"
    (tree / "etc").mkdir(parents=True)
    assert store.add_version("plain", tree, origin="t").manifest["packages"] == []


def test_a_status_symlink_leaving_the_tree_is_not_followed(
    store: ImageStore, tmp_path: Path
) -> None:
    outside = tmp_path / "host-status"
    outside.write_text(DPKG_STATUS)
    tree = tmp_path / "evil"
    (tree / "var" / "lib" / "dpkg").mkdir(parents=True)
    (tree / "var" / "lib" / "dpkg" / "status").symlink_to(outside)
    assert store.add_version("evil", tree, origin="t").manifest["packages"] == []


# -- errors --------------------------------------------------------------------------------


def test_unknown_version_names_it_and_lists_what_exists(store: ImageStore, src: Path) -> None:
    store.add_version("base", src, origin="t")
    store.add_version("base", src, origin="t")
    with pytest.raises(ImageNotFound) as err:
        store.get("base", 7)
    assert str(err.value) == "unknown image 'base:7': image 'base' has base:1, base:2"
    assert isinstance(err.value, NotFound) and isinstance(err.value, UsageError)
    assert err.value.exit_code == 2
    with pytest.raises(ImageNotFound, match=r"^unknown image 'nope': the store has base$"):
        store.get("nope")
    with pytest.raises(ImageNotFound, match=r"unknown image 'base:9': image 'base' has"):
        store.remove("base", 9)
    with pytest.raises(ImageNotFound, match=r"^unknown image 'x': the store has nothing$"):
        ImageStore(store.root.parent / "empty").versions("x")


def test_source_must_be_a_directory(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        store.add_version("base", tmp_path / "missing", origin="t")


def test_errors_survive_pickling() -> None:
    import pickle

    err = ImageNotFound("base:3", ["base:1"], where="image 'base'")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


# -- removal -------------------------------------------------------------------------------


def test_remove_one_version_then_all(store: ImageStore, src: Path) -> None:
    for _ in range(3):
        store.add_version("base", src, origin="t")
    assert store.remove("base", 3) == [3]
    assert [v.version for v in store.versions("base")] == [1, 2]
    # numbers are never given twice: base:3 meant other bytes
    v4 = store.add_version("base", src, origin="t")
    assert v4.version == 4 and v4.manifest["parent"] == 2
    assert store.remove("base") == [1, 2, 4]
    assert store.names() == [] and store.list() == []
    assert leftovers(store) == []


# -- interrupted adds ----------------------------------------------------------------------


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_an_interrupted_copy_leaves_no_half_version(
    store: ImageStore, src: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]
) -> None:
    store.add_version("base", src, origin="t")

    def half_copy(self: ImageStore, source: Path, dest: Path) -> None:
        dest.mkdir()
        (dest / "half").write_text("x")
        raise exc()

    monkeypatch.setattr(ImageStore, "_copy_tree", half_copy)
    with pytest.raises(exc):
        store.add_version("base", src, origin="t")
    assert [v.version for v in store.versions("base")] == [1]
    assert leftovers(store) == []
    with pytest.raises(ImageNotFound):
        store.get("base", 2)


def test_an_interrupted_move_gives_the_tree_back(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = make_tree(tmp_path / "staging")

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "make_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        store.add_version("base", staging, origin="t", move=True)
    assert (staging / "etc" / "hostname").read_text() == "hello\n"
    assert leftovers(store) == [] and store.names() == []


def test_gc_removes_what_dead_processes_left(store: ImageStore, src: Path) -> None:
    store.add_version("base", src, origin="t")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [
        store.root / "base" / f".v2.tmp-{dead.pid}",
        store.root / ".tmp" / f".import-base.abc.tmp-{dead.pid}",
    ]
    alive = store.root / "base" / ".v3.tmp-1"  # pid 1 runs
    for d in [*stale, alive]:
        (d / "rootfs").mkdir(parents=True)
    assert sorted(store.gc()) == sorted(stale)
    assert alive.exists() and not any(d.exists() for d in stale)
    assert [v.version for v in store.versions("base")] == [1]


def test_concurrent_adds_get_distinct_versions(store: ImageStore, src: Path) -> None:
    errors: list[BaseException] = []

    def add() -> None:
        try:
            store.add_version("base", src, origin="t")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v.version for v in store.versions("base")] == [1, 2, 3, 4]


# -- imports -------------------------------------------------------------------------------


def test_import_tree(store: ImageStore, src: Path) -> None:
    v = store.import_tree("base", src)
    assert v.manifest["origin"] == f"import {src}"
    assert (v.rootfs / "etc" / "hostname").read_text() == "hello\n"
    assert (src / "etc" / "hostname").exists()  # copied, not moved


@pytest.mark.parametrize("suffix, flag", [("tar", ""), ("tar.gz", "-z"), ("tar.zst", "--zstd")])
def test_import_tarball(
    store: ImageStore, src: Path, tmp_path: Path, suffix: str, flag: str
) -> None:
    tarball = tmp_path / f"root.{suffix}"
    argv = ["tar", "--numeric-owner", "-C", str(src), "-cf", str(tarball), "."]
    subprocess.run([*argv[:1], *([flag] if flag else []), *argv[1:]], check=True)
    v = store.import_tarball("base", tarball)
    assert v.manifest["origin"] == f"import {tarball}"
    assert (v.rootfs / "etc" / "hostname").read_text() == "hello\n"
    tool, tool2 = v.rootfs / "usr/bin/tool", v.rootfs / "usr/bin/tool2"
    assert tool.stat().st_ino == tool2.stat().st_ino and tool.stat().st_mode & 0o777 == 0o755
    assert (v.rootfs / "bin").readlink() == Path("usr/bin")
    assert v.manifest["packages"][0] == "adduser=3.134"
    assert leftovers(store) == [] and not list((store.root / ".tmp").iterdir())


def _tarball(path: Path, member: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("./etc/ok")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"ok\n"))
        info = tarfile.TarInfo(member)
        info.type = kind
        info.linkname = link
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    return path


@pytest.mark.parametrize(
    "member, kind, link, refused",
    [
        ("./etc/../../evil", tarfile.REGTYPE, "", "./etc/../../evil"),
        ("../evil", tarfile.REGTYPE, "", "../evil"),
        ("/etc/evil", tarfile.REGTYPE, "", "/etc/evil"),
        ("./etc/evil", tarfile.LNKTYPE, "../../etc/passwd", "../../"),
        ("./etc/evil", tarfile.LNKTYPE, "/etc/passwd", "/"),
    ],
)
def test_tarball_escaping_the_tree_is_refused(
    store: ImageStore, tmp_path: Path, member: str, kind: bytes, link: str, refused: str
) -> None:
    tarball = _tarball(tmp_path / "bad.tar", member, kind, link)
    with pytest.raises(UnsafeTarball, match="refusing") as err:
        store.import_tarball("base", tarball)
    assert refused in str(err.value) and "\n" not in str(err.value)
    assert store.names() == [] and leftovers(store) == []
    assert not (tmp_path / "evil").exists()


def test_symlinks_to_absolute_paths_are_fine(store: ImageStore, tmp_path: Path) -> None:
    tarball = _tarball(tmp_path / "ok.tar", "./etc/localtime", tarfile.SYMTYPE, "/usr/share/z")
    v = store.import_tarball("base", tarball)
    assert (v.rootfs / "etc" / "localtime").readlink() == Path("/usr/share/z")


def test_missing_tarball(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such tarball"):
        store.import_tarball("base", tmp_path / "nope.tar")
