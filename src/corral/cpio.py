"""Writing ``newc`` cpio archives, the format Linux unpacks an initramfs from.

One small writer for every initrd corral makes (token initrds, test and deploy
ramdisks): the format is a fixed ASCII header per entry, 4-byte aligned, so it needs
no dependency. Timestamps are zero, so archives are reproducible.
"""

from __future__ import annotations

import io
import os

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000


class CpioWriter:
    """Writes a ``newc`` cpio archive (the format the kernel unpacks as an initramfs)."""

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if mode & _S_IFDIR else 1,  # nlink
            0,  # mtime: fixed, so that the archive is reproducible
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents, once each)."""
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.directory(os.path.dirname(name))
        self._dirs.add(name)
        self._entry(name, _S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, _S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, _S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


def newc_archive(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An archive of ``{path: (content, mode)}`` with the parent directories it needs."""
    out = io.BytesIO()
    writer = CpioWriter(out)
    for name, (data, mode) in files.items():
        writer.file(name, data, mode)
    writer.finish()
    return out.getvalue()
