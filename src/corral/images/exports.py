"""What an image version is served as: its tree, a chunked tar stream, a squashfs.

:func:`build_exports` makes them once per version, under ``<version>/exports/``, and records
every file with its size and sha256 in the version's ``manifest.json``:

- ``tree``: the ``rootfs`` directory itself, for rsync;
- ``stream``: the tree as one GNU tar (POSIX format, numeric owners, xattrs, ACLs, sparse
  files, names sorted, one filesystem) compressed by zstd, cut into fixed-size chunks of the
  *compressed* bytes (``exports/chunks/00000000.bin`` ...) and described by
  ``exports/stream.json`` (chunk size, count, each chunk's sha256, total size, whole-stream
  sha256). A node fetches and checks chunk by chunk and pipes them, in order, into
  ``zstd -d | tar -x``;
- ``squashfs``: the tree as one squashfs for diskless nodes, cut into chunks the same way
  (``exports/squashfs/chunks/``, ``exports/squashfs/stream.json``): every transport that
  sends the stream sends it too (:class:`Chunked`), and a node joins the chunks into the
  file it mounts.

Before serving an export, :func:`verify_export` checks every file against the manifest and
raises :class:`~corral.images.store.CorruptExport` naming the first one that differs.

Compression levels, measured on a 199 MB (tar: 204.8 MB) ``debootstrap --variant=minbase
bookworm`` tree, zstd 1.5.4, 2 cores (x86-64 VM, shared and busy: times are +-30 %)::

    zstd   size     ratio  compress -T1  -T0     decompress   tar MB/s delivered when the node
    level  MB              s             s       MB/s (out)   decompresses while receiving at
                                                              20 Mbit/s   1 Gbit/s   10 Gbit/s
     1     92.9     2.20    0.7          0.5     1349         5.5         275        1349
     3     84.4     2.43    0.8          0.6     1301         6.1         303        1301
     6     81.1     2.53    2.0          2.1     1205         6.3         316        1205
     9     78.1     2.62    3.1          2.3     1088         6.6         328        1088
    12     77.7     2.64      -          8.9        -           -           -           -
    19     72.5     2.82   95.6         63.4      990         7.1         353         990

zstd decompresses 1-1.35 GB/s of tar on one core at every level, more than a 1 Gbit/s link
brings even at ratio 2.8, so up to 1 Gbit/s what a node receives is link rate x ratio and a
higher level is faster; only at 10 Gbit/s does decompression become the limit (and then a
lower level is faster, though a node's disk is usually slower still). Level 9 gives 93 % of
level 19's ratio for 1/30 of its time, +8 % over level 3 for ~2 s more on 200 MB; between
9 and 19 each step costs far more time for little ratio. So the stream is zstd -9 with
``-T0`` (all cores; zstd's multithreaded output does not depend on the thread count); pass
``level=19`` for an image sent over slow links to many nodes. Built by
:func:`build_exports` on the same tree: stream 78.1 MB (19 chunks of 4 MiB) in 3.4-4.2 s,
squashfs 86.5 MB in 12-19 s.

squashfs, same tree, 128 KiB blocks (mksquashfs 4.5.1, all cores)::

    -comp               size MB   mksquashfs s   unsquashfs CPU s
    gzip                 91.7        15.9            0.50
    zstd level 3         93.4         1.1            0.21
    zstd level 9         90.1         1.5              -
    zstd level 15        86.5        19.0            0.22
    zstd level 19        86.1        46.4            0.26
    xz                   83.1        54.7            2.39
    xz -Xbcj x86         82.2        44.4            2.29

A diskless root decompresses a block on every page-cache miss, for the node's whole life:
xz would save 4 % of the size for ten times the CPU per read, so zstd; level 15 (the
mksquashfs default for zstd) is 4 % smaller than 9 for a one-off 19 s, level 19 buys
nothing more. Debian bookworm's kernels (6.1, generic and cloud) have
CONFIG_SQUASHFS_ZSTD=y; a distribution whose kernel lacks it needs ``-comp xz`` instead.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corral.errors import CommandFailed, InvalidValue
from corral.images.store import (
    CorruptExport,
    ImageError,
    ImageVersion,
    flocked,
    read_manifest,
    remove_tree,
    write_json_atomic,
    write_manifest,
)
from corral.run import run, spawn

log = logging.getLogger(__name__)

EXPORTS = ("tree", "stream", "squashfs")
STREAM_LEVEL = 9
SQUASHFS_LEVEL = 15
SQUASHFS_BLOCK = 128 * 1024
CHUNK_SIZE = 4 << 20
CHUNK_DIR = "exports/chunks"
STREAM_INDEX = "exports/stream.json"
SQUASHFS_DIR = "exports/squashfs"
#: the exports that are chunked, and so sent by the chunk transports
CHUNKED = ("stream", "squashfs")

# GNU tar options of the stream; the receiver's side is `zstd -d | tar -x --numeric-owner
# --xattrs --xattrs-include='*' --acls -p`.
TAR_CREATE = (
    "--create",
    "--file=-",
    "--format=posix",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
    # sparse format 0.0: the map in pax keywords under the member's own name; 1.0 (tar's
    # default) names each sparse member "GNUSparseFile.<pid>", so no two builds would match
    "--sparse-version=0.0",
    "--sort=name",
    "--one-file-system",
    # reproducible (same tree, same bytes): no pid in header names, no access/change times
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
)


def chunk_name(index: int, export: str = "stream") -> str:
    base = CHUNK_DIR if export == "stream" else f"{SQUASHFS_DIR}/chunks"
    return f"{base}/{index:08d}.bin"


def index_name(export: str = "stream") -> str:
    return STREAM_INDEX if export == "stream" else f"{SQUASHFS_DIR}/stream.json"


@dataclass(frozen=True)
class Chunked:
    """One chunked export of an image version, as the transports send it: the tar stream
    (disk installs) or the squashfs (diskless boots). Both are laid out alike: an index
    (``stream.json``) and ``chunks/NNNNNNNN.bin`` in one directory."""

    image: ImageVersion
    export: str = "stream"

    def __post_init__(self) -> None:
        if self.export not in CHUNKED:
            raise InvalidValue(f"export {self.export!r} is not chunked: use {' or '.join(CHUNKED)}")

    @property
    def ref(self) -> str:
        """``NAME:VERSION``, and ``/squashfs`` after it for the squashfs."""
        return self.image.ref if self.export == "stream" else f"{self.image.ref}/squashfs"

    @property
    def name(self) -> str:
        return self.image.name

    @property
    def version(self) -> int:
        return self.image.version

    @property
    def directory(self) -> Path:
        """Where ``chunks/`` and the index are."""
        return (self.image.path / index_name(self.export)).parent

    @property
    def index_path(self) -> Path:
        return self.image.path / index_name(self.export)

    def chunk_path(self, index: int) -> Path:
        return self.image.path / chunk_name(index, self.export)

    @property
    def url_path(self) -> str:
        """Its path on corral's HTTP server (``/chunks/N.bin`` under it)."""
        base = f"/images/{self.image.name}/{self.image.version}"
        return base if self.export == "stream" else f"{base}/squashfs"

    def index(self) -> dict[str, Any]:
        """The index: chunk size, count, each chunk's sha256, size, whole sha256."""
        try:
            data: dict[str, Any] = json.loads(self.index_path.read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(
                f"image {self.image.ref} has no readable {self.export} export ({exc})",
                f"make it with 'corral image export {self.image.ref}'",
            ) from None
        return data

    def verify(self) -> None:
        verify_export(self.image, self.export)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_entry(version: ImageVersion, relative: str) -> dict[str, Any]:
    path = version.path / relative
    return {"name": relative, "size": path.stat().st_size, "sha256": sha256_file(path)}


# -- verification -------------------------------------------------------------------------


def _verify_files(version: ImageVersion, entry: dict[str, Any]) -> None:
    for item in entry.get("files", []):
        path = version.path / item["name"]
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            actual = "(missing)"
        if actual != item["sha256"]:
            raise CorruptExport(path, item["sha256"], actual)


def _entry(version: ImageVersion, which: str) -> dict[str, Any]:
    if which not in EXPORTS:
        raise InvalidValue(f"unknown export {which!r}: use one of {', '.join(EXPORTS)}")
    entry = read_manifest(version.path).get("exports", {}).get(which)
    if not isinstance(entry, dict):
        raise ImageError(f"image {version.ref} has no {which} export", "build its exports first")
    return entry


def verify_export(version: ImageVersion, which: str) -> None:
    """Check every file of one export against the manifest on disk (call before serving).

    Raises :class:`CorruptExport` naming the file and both hashes, or :class:`ImageError`
    when the export was never built.
    """
    entry = _entry(version, which)
    if which == "tree":
        if not version.rootfs.is_dir():
            raise ImageError(f"image {version.ref}: {version.rootfs} is missing")
        return
    _verify_files(version, entry)


def verify_chunk(version: ImageVersion, index: int, data: bytes, export: str = "stream") -> bool:
    """Whether ``data`` is chunk ``index`` of the version's stream (or squashfs), as the
    manifest says."""
    entry = _entry(version, export)
    name = chunk_name(index, export)
    expected = next((f["sha256"] for f in entry["files"] if f["name"] == name), None)
    return expected is not None and hashlib.sha256(data).hexdigest() == expected


# -- building -----------------------------------------------------------------------------


def _reusable(version: ImageVersion, entry: Any, params: dict[str, Any]) -> bool:
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in params.items()):
        return False
    try:
        _verify_files(version, entry)
    except CorruptExport as exc:
        log.warning("%s: rebuilding: %s", version.ref, exc)
        return False
    return True


def build_exports(
    version: ImageVersion,
    *,
    chunk_size: int = CHUNK_SIZE,
    level: int = STREAM_LEVEL,
    squashfs_level: int = SQUASHFS_LEVEL,
    which: Collection[str] = EXPORTS,
) -> dict[str, Any]:
    """Make the exports of ``version`` that do not exist yet and return the manifest's
    ``exports`` (also updated in ``version.manifest``).

    An export already built with the same parameters whose files match the manifest is
    reused; one built differently, or damaged, is rebuilt.
    """
    if chunk_size < 4096:
        raise InvalidValue(f"chunk size {chunk_size} is too small: use at least 4096 bytes")
    for what, value in (("stream", level), ("squashfs", squashfs_level)):
        if not 1 <= value <= 19:
            raise InvalidValue(f"zstd level {value} for the {what}: use 1 to 19")
    for w in which:
        if w not in EXPORTS:
            raise InvalidValue(f"unknown export {w!r}: use one of {', '.join(EXPORTS)}")
    if not version.rootfs.is_dir():
        raise ImageError(f"image {version.ref}: {version.rootfs} is missing")
    version.exports_dir.mkdir(exist_ok=True)
    with flocked(version.exports_dir / ".lock"):
        manifest = read_manifest(version.path)
        exports: dict[str, Any] = dict(manifest.get("exports") or {})
        exports["tree"] = {"path": "rootfs"}
        wanted: list[tuple[str, dict[str, Any], Any]] = [
            ("stream", {"chunk_size": chunk_size, "level": level}, _build_stream),
            (
                "squashfs",
                {"level": squashfs_level, "block_size": SQUASHFS_BLOCK, "chunk_size": chunk_size},
                _squashfs,
            ),
        ]
        for name, params, build in wanted:
            if name not in which or _reusable(version, exports.get(name), params):
                continue
            if name in exports:  # unlisted before its files change
                del exports[name]
                manifest["exports"] = exports
                write_manifest(version.path, manifest)
            started = time.monotonic()
            entry = build(version, **params)
            entry.update(params, seconds=round(time.monotonic() - started, 2))
            exports[name] = entry
            log.info("%s: %s export built in %.1f s", version.ref, name, entry["seconds"])
        manifest["exports"] = exports
        write_manifest(version.path, manifest)
    version.manifest.clear()
    version.manifest.update(manifest)
    return exports


def _cut(
    version: ImageVersion,
    export: str,
    source: IO[bytes],
    chunk_size: int,
    meta: dict[str, Any],
    done: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Cut what ``source`` gives into chunks while hashing them, write the export's index,
    and swap both in (the manifest does not list the export while this happens). ``done``
    runs once ``source`` is read, before anything is swapped in (it raises if the program
    writing ``source`` failed)."""
    target = Chunked(version, export)
    tmp = version.exports_dir / f".{export}.tmp-{os.getpid()}"
    remove_tree(tmp)
    (tmp / "chunks").mkdir(parents=True)
    whole = hashlib.sha256()
    hashes: list[str] = []
    total = 0
    try:
        while data := source.read(chunk_size):
            whole.update(data)
            hashes.append(hashlib.sha256(data).hexdigest())
            total += len(data)
            with open(tmp / "chunks" / f"{len(hashes) - 1:08d}.bin", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        done()
        index = {
            "image": version.ref,
            **meta,
            "chunk_size": chunk_size,
            "count": len(hashes),
            "size": total,
            "sha256": whole.hexdigest(),
            "chunks": hashes,
        }
        write_json_atomic(tmp / "stream.json", index)
        target.directory.mkdir(parents=True, exist_ok=True)
        remove_tree(target.directory / "chunks")
        os.replace(tmp / "chunks", target.directory / "chunks")
        os.replace(tmp / "stream.json", target.index_path)
    finally:
        remove_tree(tmp)
    files = [_file_entry(version, index_name(export))]
    files += [
        {
            "name": chunk_name(i, export),
            "size": min(chunk_size, total - i * chunk_size),
            "sha256": h,
        }
        for i, h in enumerate(hashes)
    ]
    return {"files": files, "count": len(hashes), "size": total, "sha256": whole.hexdigest()}


def _build_stream(version: ImageVersion, *, chunk_size: int, level: int) -> dict[str, Any]:
    """tar | zstd, read here and cut into chunks while hashing: no full copy on disk."""
    # corral.run.spawn gives a child no stdin, so tar itself runs zstd (no shell involved:
    # tar splits the program string into argv) and hands us zstd's output.
    argv = [
        "tar",
        *TAR_CREATE,
        f"--use-compress-program=zstd -q -{level} -T0",
        "-C",
        str(version.rootfs),
        ".",
    ]
    meta = {
        "format": "tar+zstd",
        "decompress": "zstd -d | tar -x --numeric-owner --xattrs --xattrs-include=* --acls -p",
        "level": level,
    }
    with tempfile.TemporaryFile() as errors:
        proc = spawn(argv, env={"LC_ALL": "C"}, stdout=subprocess.PIPE, stderr=errors.fileno())
        out = proc.stdout
        assert out is not None

        def done() -> None:
            out.close()
            code = proc.wait()
            if code != 0:
                errors.seek(0)
                raise CommandFailed(argv, code, errors.read().decode(errors="replace"))

        try:
            return _cut(version, "stream", out, chunk_size, meta, done)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _squashfs(
    version: ImageVersion, *, level: int, block_size: int, chunk_size: int
) -> dict[str, Any]:
    """mksquashfs into a temporary file, cut into chunks like the stream."""
    tmp = version.exports_dir / f".image.squashfs.tmp-{os.getpid()}"
    created = version.manifest.get("created")
    try:
        mkfs_time = calendar.timegm(time.strptime(str(created), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        mkfs_time = int(version.rootfs.stat().st_mtime)
    try:
        run(
            [
                "mksquashfs",
                str(version.rootfs),
                str(tmp),
                "-comp",
                "zstd",
                "-Xcompression-level",
                str(level),
                "-b",
                str(block_size),
                "-noappend",
                "-no-progress",
                "-quiet",
                "-one-file-system",
                "-mkfs-time",
                str(max(mkfs_time, 0)),
            ]
        )
        with open(tmp, "rb") as source:
            meta = {"format": "squashfs", "level": level, "block_size": block_size}
            return _cut(version, "squashfs", source, chunk_size, meta)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def squashfs_chunks(version: ImageVersion) -> Iterator[Path]:
    """The squashfs's chunk files, in order (joined, they are the file a node mounts)."""
    count = int(Chunked(version, "squashfs").index()["count"])
    return (version.path / chunk_name(i, "squashfs") for i in range(count))
