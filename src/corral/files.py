"""Writing files so that a reader never sees half of one.

The node agent has its own copy (``corral.agent.identity.write_atomic``): it is
stdlib-only and copied alone into the deploy ramdisk, so it cannot import this one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(
    path: Path,
    data: bytes | str,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
    *,
    durable: bool = False,
) -> None:
    """Write ``path`` through a temporary file next to it, renamed over it at the end.

    Readers see the old file or the new one, never a part of either. ``mode`` is set
    whatever the umask (None: 0o644 less the umask); ``owner`` is a (uid, gid);
    ``durable`` syncs the data to disk before the rename, for files that must survive
    a crash. Writers of one path must not race: the temporary name is fixed (cheaper
    than random ones for the thousands of files a sync writes).
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.corral-tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a link someone put there: never followed
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, 0o644 if mode is None else mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
