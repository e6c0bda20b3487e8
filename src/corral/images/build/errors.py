"""How an image build fails: the errors of :mod:`corral.images.build` (but
:class:`~corral.images.build.UnknownFamily`, which the registry raises, next to it)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from corral.errors import CorralError


class BuildError(CorralError):
    """An image build that failed (nothing is left in the staging directory)."""


class UnknownPackage(BuildError):
    exit_code = 2

    def __init__(self, packages: Sequence[str], where: str, hint: str | None = None) -> None:
        names = ", ".join(f"'{p}'" for p in packages)
        plural = "s" if len(packages) > 1 else ""
        super().__init__(f"unknown package{plural} {names} {where}", hint)
        self.packages = list(packages)
        self.where = where
        self.args = (list(packages), where, hint)


class DiskFull(BuildError):
    def __init__(self, directory: Path, what: str) -> None:
        free = ""
        try:
            usage = shutil.disk_usage(directory)
            free = f" ({usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB)"
        except OSError:
            pass
        super().__init__(
            f"no space left on device in {directory}{free} while {what}",
            "free some space there or build somewhere bigger (a minimal bootable image "
            "needs about 1 GiB, its package cache a few hundred MiB)",
        )
        self.directory = directory
        self.args = (directory, what)
