"""Image exports with the real tools: tar | zstd in chunks, mksquashfs, and back again."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.errors import InvalidValue
from corral.images.exports import build_exports, squashfs_chunks, verify_chunk, verify_export
from corral.images.store import CorruptExport, ImageError, ImageStore, ImageVersion

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parallel_safe,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("mksquashfs", "unsquashfs", "zstd", "tar", "rsync")),
        reason="needs squashfs-tools, zstd, tar and rsync",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, device nodes, xattrs)"),
]

CHUNK = 64 * 1024


def make_tree(root: Path) -> Path:
    """A small root tree with everything a real one has."""
    for d in ("etc", "usr/bin", "usr/lib", "dev", "tmp", "var/empty", "root"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "hostname").write_text("node\n")
    (root / "etc" / "name with spaces").write_text("x\n")
    (root / "etc" / "name\nwith newline").write_text("y\n")
    (root / "etc" / "ünïcode").write_text("z\n")
    shadow = root / "etc" / "shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\n")
    shadow.chmod(0o640)
    os.chown(shadow, 0, 42)
    # incompressible data: several chunks of the compressed stream
    (root / "usr" / "lib" / "blob").write_bytes(os.urandom(300 * 1024))
    (root / "usr" / "lib" / "text").write_text("corral " * 50_000)
    su = root / "usr" / "bin" / "su"
    su.write_bytes(b"\x7fELF" + b"\0" * 100)
    su.chmod(0o4755)
    os.link(su, root / "usr" / "bin" / "su-hardlink")
    (root / "usr" / "bin" / "sh").symlink_to("dash")  # dangling
    (root / "bin").symlink_to("usr/bin")
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev" / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(root / "dev" / "fifo", 0o600)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    (root / "var" / "empty").chmod(0o555)
    odd = root / "etc" / "odd"
    odd.write_text("odd\n")
    odd.chmod(0o2571)
    nothing = root / "etc" / "no-permissions"
    nothing.write_text("none\n")
    nothing.chmod(0)
    owned = root / "etc" / "owned"
    owned.write_text("owned\n")
    os.chown(owned, 1234, 5678, follow_symlinks=False)
    os.chown(root / "usr" / "bin" / "sh", 4321, 8765, follow_symlinks=False)
    os.setxattr(root / "etc" / "hostname", "user.corral", b"value")
    os.setxattr(root / "etc" / "hostname", "trusted.corral", b"\x00\x01secret")
    os.setxattr(su, "user.other", b"on a hard link")
    with open(root / "usr" / "lib" / "sparse", "wb") as f:  # 8 MiB, 1 byte of data
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"!")
    os.utime(root / "etc" / "hostname", (1_000_000_000, 1_000_000_000))
    return root


def snapshot(root: Path) -> dict[str, Any]:
    """Everything that must survive: type, mode, owner, size, mtime, content, link target,
    device numbers, xattrs (ACLs included), and which paths share an inode."""
    entries: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            info: dict[str, Any] = {
                "mode": st.st_mode,
                "owner": (st.st_uid, st.st_gid),
                "xattrs": {
                    k: os.getxattr(path, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(path, follow_symlinks=False))
                },
            }
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                info["mtime"] = int(st.st_mtime)
                info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = st.st_rdev
            entries[rel] = info
    links = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return {"entries": entries, "hardlinks": links}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageStore, ImageVersion, Path]:
    base = tmp_path_factory.mktemp("exports")
    tree = make_tree(base / "src")
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:1234:rw", str(tree / "etc" / "odd")], check=True)
    store = ImageStore(base / "images")
    version = store.import_tree("base", tree)
    build_exports(version, chunk_size=CHUNK, level=3)
    return store, version, base


@pytest.fixture
def version(built: tuple[ImageStore, ImageVersion, Path]) -> ImageVersion:
    store, version, _ = built
    return store.get("base", version.version)


def chunks(version: ImageVersion) -> list[Path]:
    return sorted((version.path / "exports" / "chunks").iterdir())


def stream_bytes(version: ImageVersion) -> bytes:
    return b"".join(p.read_bytes() for p in chunks(version))


def test_the_copy_in_the_store_keeps_everything(
    built: tuple[ImageStore, ImageVersion, Path],
) -> None:
    _, version, base = built
    assert snapshot(version.rootfs) == snapshot(base / "src")
    assert ["usr/bin/su", "usr/bin/su-hardlink"] in snapshot(version.rootfs)["hardlinks"]


def test_manifest_lists_every_export_file(version: ImageVersion) -> None:
    exports = version.manifest["exports"]
    assert exports["tree"] == {"path": "rootfs"}
    stream = exports["stream"]
    files = {f["name"]: f for f in stream["files"]}
    assert len(chunks(version)) == stream["count"] >= 3
    for p in chunks(version):
        entry = files[f"exports/chunks/{p.name}"]
        assert entry["size"] == p.stat().st_size
        assert entry["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert all(p.stat().st_size == CHUNK for p in chunks(version)[:-1])
    data = stream_bytes(version)
    assert stream["size"] == len(data)
    assert stream["sha256"] == hashlib.sha256(data).hexdigest()
    assert (stream["chunk_size"], stream["level"]) == (CHUNK, 3)
    squashfs = exports["squashfs"]
    names = [f["name"] for f in squashfs["files"]]
    assert names[0] == "exports/squashfs/stream.json"
    assert names[1:] == [f"exports/squashfs/chunks/{i:08d}.bin" for i in range(squashfs["count"])]
    joined = b"".join(p.read_bytes() for p in squashfs_chunks(version))
    assert squashfs["size"] == len(joined) and joined[:4] == b"hsqs"  # squashfs's magic
    assert squashfs["sha256"] == hashlib.sha256(joined).hexdigest()


def test_stream_index(version: ImageVersion) -> None:
    import json

    index = json.loads((version.path / "exports" / "stream.json").read_text())
    data = stream_bytes(version)
    assert index["chunk_size"] == CHUNK and index["count"] == len(chunks(version))
    assert index["size"] == len(data) and index["sha256"] == hashlib.sha256(data).hexdigest()
    assert index["chunks"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in chunks(version)]


def expected_names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def squashfs_file(version: ImageVersion, into: Path) -> Path:
    """The squashfs a diskless node mounts: its chunks joined."""
    path = into / "image.squashfs"
    with path.open("wb") as f:
        for chunk in squashfs_chunks(version):
            f.write(chunk.read_bytes())
    return path


def test_unsquashfs_lists_the_files(version: ImageVersion, tmp_path: Path) -> None:
    out = subprocess.run(
        ["unsquashfs", "-l", "-d", "R", str(squashfs_file(version, tmp_path))],
        capture_output=True,
        check=True,
    ).stdout.decode()
    listed = {line[2:] for line in out.splitlines() if line.startswith("R/")}
    # unsquashfs prints a newline in a name as is: that one name spans two lines
    assert expected_names(version.rootfs) - listed == {"etc/name\nwith newline"}
    assert "etc/name" in listed and "usr/bin/su-hardlink" in listed and "dev/null" in listed


def test_the_stream_lists_the_files(version: ImageVersion) -> None:
    tar = subprocess.run(["zstd", "-dq"], input=stream_bytes(version), capture_output=True)
    assert tar.returncode == 0
    out = subprocess.run(
        ["tar", "-t", "--quoting-style=literal"],
        input=tar.stdout,
        capture_output=True,
        check=True,
    ).stdout.decode()
    listed = {line.removeprefix("./").rstrip("/") for line in out.split("\n") if line}
    names = expected_names(version.rootfs)
    assert names - listed == {"etc/name\nwith newline"}  # printed on two lines


def test_the_stream_reproduces_the_tree(version: ImageVersion, tmp_path: Path) -> None:
    target = tmp_path / "node"
    target.mkdir()
    unzstd = subprocess.run(["zstd", "-dq"], input=stream_bytes(version), capture_output=True)
    subprocess.run(
        [
            "tar",
            "-x",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "-p",
            "-C",
            str(target),
        ],
        input=unzstd.stdout,
        check=True,
    )
    assert snapshot(target) == snapshot(version.rootfs)
    rsync = subprocess.run(
        ["rsync", "-anciHAX", "--delete", f"{version.rootfs}/", f"{target}/"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert rsync.stdout == ""
    sparse = target / "usr" / "lib" / "sparse"
    assert sparse.stat().st_blocks * 512 < 1 << 20  # still sparse


def test_the_squashfs_reproduces_the_tree(version: ImageVersion, tmp_path: Path) -> None:
    target = tmp_path / "diskless"
    subprocess.run(
        [
            "unsquashfs",
            "-q",
            "-n",
            "-d",
            str(target),
            str(squashfs_file(version, tmp_path)),
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = snapshot(target), snapshot(version.rootfs)
    # squashfs keeps user, trusted and security xattrs only: ACLs (system.*) are dropped
    for tree in (ours, theirs):
        for entry in tree["entries"].values():
            entry["xattrs"].pop("system.posix_acl_access", None)
            entry["xattrs"].pop("system.posix_acl_default", None)
    assert ours == theirs


def test_exports_verify_and_a_second_build_reuses_them(version: ImageVersion) -> None:
    verify_export(version, "tree")
    verify_export(version, "stream")
    verify_export(version, "squashfs")
    files = [*chunks(version), *squashfs_chunks(version)]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    again = build_exports(version, chunk_size=CHUNK, level=3)
    assert again == version.manifest["exports"]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before


def test_verify_chunk(version: ImageVersion) -> None:
    first, second = chunks(version)[:2]
    assert verify_chunk(version, 0, first.read_bytes())
    assert not verify_chunk(version, 0, second.read_bytes())
    assert not verify_chunk(version, 10_000, first.read_bytes())


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_then_rebuilt(
    built: tuple[ImageStore, ImageVersion, Path],
) -> None:
    store, _, base = built
    version = store.add_version("flip", base / "src", origin="test")
    build_exports(version, chunk_size=CHUNK, level=3)
    whole = version.manifest["exports"]["stream"]["sha256"]
    chunk = chunks(version)[1]
    good = chunk.read_bytes()
    _flip(chunk)
    with pytest.raises(CorruptExport) as err:
        verify_export(version, "stream")
    message = str(err.value)
    assert "exports/chunks/00000001.bin" in message
    assert hashlib.sha256(good).hexdigest() in message
    assert hashlib.sha256(chunk.read_bytes()).hexdigest() in message
    assert not verify_chunk(version, 1, chunk.read_bytes())
    assert verify_chunk(version, 1, good)

    squashfs = next(iter(squashfs_chunks(version)))
    _flip(squashfs, 5000)
    with pytest.raises(CorruptExport, match=r"exports/squashfs/chunks/00000000\.bin"):
        verify_export(version, "squashfs")

    # build_exports does not reuse damaged exports; the same tree gives the same stream
    build_exports(version, chunk_size=CHUNK, level=3)
    verify_export(version, "stream")
    verify_export(version, "squashfs")
    assert version.manifest["exports"]["stream"]["sha256"] == whole
    assert chunks(version)[1].read_bytes() == good


def test_other_parameters_rebuild_the_same_stream(
    built: tuple[ImageStore, ImageVersion, Path],
) -> None:
    store, _, base = built
    version = store.add_version("rechunk", base / "src", origin="test")
    build_exports(version, chunk_size=CHUNK, level=3, which=["stream"])
    whole = version.manifest["exports"]["stream"]["sha256"]
    assert "squashfs" not in version.manifest["exports"]
    build_exports(version, chunk_size=4 * CHUNK, level=3, which=["stream"])
    stream = version.manifest["exports"]["stream"]
    assert stream["sha256"] == whole and stream["chunk_size"] == 4 * CHUNK
    assert len(chunks(version)) == stream["count"]
    verify_export(version, "stream")


def test_missing_and_unknown_exports(built: tuple[ImageStore, ImageVersion, Path]) -> None:
    store, _, base = built
    version = store.add_version("bare", base / "src", origin="test")
    with pytest.raises(ImageError, match="image bare:1 has no stream export"):
        verify_export(version, "stream")
    with pytest.raises(InvalidValue, match="unknown export 'iso'"):
        verify_export(version, "iso")
    with pytest.raises(InvalidValue, match="zstd level 25"):
        build_exports(version, level=25)
