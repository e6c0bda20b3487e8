"""A distro's local kernel and initrd, kept in corral's own tree.

``corral serve`` hands a distro's local boot files to anyone who asks (machines boot
before they can authenticate), so it serves them only from ``$CORRAL_HOME/distros/NAME/``,
and a file gets there only by being imported when the distro is added or changed (CLI or
REST API), after a look at its first bytes: a kernel (x86 bzImage, arm64 Image or EFI
zboot) or an initrd (compressed, or a cpio archive). Anything else, ``/etc/shadow`` say,
is refused and nothing is stored. Kernels and initrds given as URLs are not imported.
"""

from __future__ import annotations

import bz2
import lzma
import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from corral.errors import InvalidValue

#: The distro fields that may name a local boot file.
FIELDS = ("kernel", "initrd")
_HEAD = 0x240  # enough for every signature below

#: gzip, zstd, xz, lz4 (legacy and frame), bzip2, cpio (newc and crc)
_INITRD_MAGIC = (
    b"\x1f\x8b",
    b"\x28\xb5\x2f\xfd",
    b"\xfd7zXZ\x00",
    b"\x02\x21\x4c\x18",
    b"\x04\x22\x4d\x18",
    b"BZh",
    b"070701",
    b"070702",
)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def tree(home: Path, distro: str) -> Path:
    """Where a distro's imported boot files live."""
    return home / "distros" / distro


def looks_like(which: str, head: bytes) -> bool:
    """Whether the first bytes of a file are those of a kernel or an initrd."""
    if which == "kernel":
        return (
            head[0x202:0x206] == b"HdrS"  # x86 boot protocol header (bzImage)
            or head[0x38:0x3C] == b"ARM\x64"  # arm64 Image
            or (head[:2] == b"MZ" and head[4:8] == b"zimg")  # EFI zboot (compressed arm64)
        )
    return head.startswith(_INITRD_MAGIC)


def _unpacks_to_cpio(path: Path) -> bool:
    """Whether a gzip, xz or bzip2 file starts a cpio archive once unpacked: the formats
    Python reads are checked to the archive inside (a rotated log is gzip too); zstd and
    lz4 initrds are taken on their magic."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    decompressor: zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor
    if head.startswith(b"\x1f\x8b"):
        decompressor = zlib.decompressobj(wbits=31)
    elif head.startswith(b"\xfd7zXZ\x00"):
        decompressor = lzma.LZMADecompressor()
    elif head.startswith(b"BZh"):
        decompressor = bz2.BZ2Decompressor()
    else:
        return True
    try:
        return decompressor.decompress(head, 6)[:6] in (b"070701", b"070702")
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
        return False


def _check(which: str, source: str) -> Path:
    path = Path(source)
    if not path.is_absolute():
        raise InvalidValue(
            f"{which} '{source}': a local {which} must be an absolute path",
            "or give a http:// or https:// URL",
        )
    try:
        # looked at before opening: a FIFO would block, /dev/zero never end
        if not stat.S_ISREG(path.stat().st_mode):
            raise InvalidValue(f"{which} '{source}' is not a regular file")
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidValue(f"{which} '{source}' is not a regular file")
            head = f.read(_HEAD)
    except OSError as exc:
        raise InvalidValue(f"cannot read {which} {source}: {exc.strerror}") from None
    if not looks_like(which, head) or (which == "initrd" and not _unpacks_to_cpio(path)):
        what = (
            "a Linux kernel (no bzImage 'HdrS' header, nor an arm64 Image)"
            if which == "kernel"
            else "an initrd (a cpio archive, plain or compressed)"
        )
        raise InvalidValue(
            f"{which} '{source}' is not {what}; nothing was stored",
            f"give the distro's boot {which} file, or its URL",
        )
    return path


@contextmanager
def imported(home: Path, distro: str, changes: Mapping[str, object]) -> Iterator[dict[str, str]]:
    """Import the local boot files among ``changes`` (distro fields) into the distro's tree.

    Yields the changes with those files' new paths, to be stored by the caller inside
    the ``with``. The files are checked and copied aside first, and renamed into the tree
    only when the block succeeds: a refused file or a failing store leaves nothing.
    """
    local = {
        which: str(changes[which])
        for which in FIELDS
        if isinstance(changes.get(which), str) and not is_url(str(changes[which]))
    }
    directory = tree(home, distro)
    sources = {which: _check(which, source) for which, source in local.items()}
    names = {which: path.name for which, path in sources.items()}
    if len(set(names.values())) < len(names):
        raise InvalidValue(
            f"distro {distro}: kernel and initrd are both called '{names['kernel']}'",
            "rename one of them: nodes fetch both by name",
        )
    final = {which: str(directory / names[which]) for which in sources}
    result = {k: str(v) for k, v in changes.items() if k in FIELDS} | final
    if not sources:
        yield result
        return
    home.mkdir(parents=True, exist_ok=True)
    (home / "distros").mkdir(mode=0o755, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{distro}.", dir=home / "distros"))
    try:
        for which, path in sources.items():
            shutil.copyfile(path, scratch / names[which])
            # a boot file, served to any machine: readable, not writable, by others
            os.chmod(scratch / names[which], 0o644)
        yield result
        directory.mkdir(mode=0o755, exist_ok=True)
        for name in names.values():
            os.replace(scratch / name, directory / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def served_file(home: Path, distro: str, sources: tuple[str, ...], name: str) -> Path | None:
    """The imported file ``name`` of the distro, if one of ``sources`` (its kernel and
    initrd fields) names it; nothing outside the distro's tree is ever returned."""
    directory = tree(home, distro)
    for source in sources:
        if is_url(source):
            continue
        path = Path(source)
        if path.name == name and path.parent == directory:
            candidate = directory / name
            if candidate.is_file() and not candidate.is_symlink():
                return candidate
    return None
