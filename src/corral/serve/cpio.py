"""A minimal writer of newc cpio archives, the format Linux unpacks initrds from.

Used to hand a node its token as a second initrd; small enough not to warrant a
dependency (the format is a fixed ASCII header per entry, 4-byte aligned).
"""

from __future__ import annotations

import io

_TRAILER = "TRAILER!!!"


def _entry(out: io.BytesIO, ino: int, name: str, mode: int, data: bytes) -> None:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(encoded)
    out.write(b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def newc_archive(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An archive of ``{path: (content, mode)}`` with the parent directories it needs."""
    out = io.BytesIO()
    dirs: list[str] = []
    for path in files:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in dirs:
                dirs.append(directory)
    ino = 1
    for directory in dirs:
        _entry(out, ino, directory, 0o040755, b"")
        ino += 1
    for path, (data, mode) in files.items():
        _entry(out, ino, path.strip("/"), 0o100000 | mode, data)
        ino += 1
    _entry(out, 0, _TRAILER, 0, b"")
    return out.getvalue()
