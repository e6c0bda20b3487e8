"""Writing ``newc`` cpio archives, the format Linux unpacks an initramfs from.

One small writer for every initrd corral makes (token initrds, test and deploy
ramdisks): the format is a fixed ASCII header per entry, 4-byte aligned, so it needs
no dependency. Every entry is owned by root with mtime 0, so archives are reproducible.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Protocol


class _Output(Protocol):
    def write(self, data: bytes, /) -> object: ...


class CpioWriter:
    """Writes a ``newc`` archive (what the kernel unpacks as an initramfs): every entry
    owned by root with mtime 0, hard links kept as such."""

    def __init__(self, out: _Output) -> None:
        self.out = out
        self.ino = 0
        self.size = 0
        self._dirs: set[str] = set()

    def _put(self, data: bytes) -> None:
        self.out.write(data)
        self.size += len(data)

    def entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        nlink: int = 1,
        ino: int | None = None,
        rdev: tuple[int, int] = (0, 0),
    ) -> int:
        if ino is None:
            self.ino += 1
            ino = self.ino
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._put(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._put(data + b"\0" * (-len(data) % 4))
        return ino

    def tree(self, root: Path) -> int:
        """Add everything under ``root``; returns the number of entries."""
        links: dict[tuple[int, int], int] = {}
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel_dir = base.relative_to(root)
            if str(rel_dir) != ".":
                st = base.lstat()
                self.entry(str(rel_dir), stat.S_IFDIR | stat.S_IMODE(st.st_mode), nlink=2)
                count += 1
            for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
                path = base / name
                rel = str(rel_dir / name) if str(rel_dir) != "." else name
                st = path.lstat()
                perm = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    self.entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in links:
                        self.entry(rel, stat.S_IFREG | perm, nlink=st.st_nlink, ino=links[key])
                    else:
                        ino = self.entry(
                            rel, stat.S_IFREG | perm, path.read_bytes(), nlink=st.st_nlink
                        )
                        links[key] = ino
                count += 1
        return count

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents, once each)."""
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.directory(os.path.dirname(name))
        self._dirs.add(name)
        self.entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self.entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self.entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> None:
        self.entry("TRAILER!!!", 0)


def newc_archive(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An archive of ``{path: (content, mode)}`` with the parent directories it needs."""
    out = io.BytesIO()
    writer = CpioWriter(out)
    for name, (data, mode) in files.items():
        writer.file(name, data, mode)
    writer.finish()
    return out.getvalue()
