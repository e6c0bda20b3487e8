"""Mounting the layout under the installer's target, and unmounting all of it on every way
out: :class:`Mounts` remembers what it mounted."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from corral.agent.disk.layout import Layout
from corral.agent.run import Runner, check, run_while_held

log = logging.getLogger("corral.agent")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return []
    base = os.path.realpath(path)
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        point = _unescape(fields[1])
        if point == base or point.startswith(base.rstrip("/") + "/"):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


class Mounts:
    """What this deployment mounted, unmounted in reverse order on every way out."""

    def __init__(
        self,
        run: Runner,
        *,
        sleep: Callable[[float], None] = time.sleep,
        tries: int = 5,
    ) -> None:
        self.run = run
        self.sleep = sleep
        self.tries = tries
        self.stack: list[str] = []

    def mount(
        self,
        source: str,
        target: Path,
        *,
        fstype: str | None = None,
        options: str | None = None,
    ) -> None:
        target.mkdir(parents=True, exist_ok=True)
        argv = ["mount"]
        if fstype:
            argv += ["-t", fstype]
        if options:
            argv += ["-o", options]
        argv += [source, str(target)]
        # a device unmounted a moment ago can still be held: "already mounted or busy"
        result = run_while_held(
            self.run, argv, held="busy", tries=self.tries, sleep=self.sleep, timeout=120
        )
        check(result, f"mounting {source}")
        self.stack.append(str(target))

    def bind(self, source: str, target: Path) -> None:
        self.mount(source, target, options="bind")

    def unmount(self, target: Path | str) -> bool:
        """Unmount one mount point, patiently (a tool that just exited may still hold it),
        lazily as the last resort; False if even that failed."""
        point = str(target)
        ok = False
        for attempt in range(self.tries):
            if self.run(["umount", point], timeout=60).ok:
                ok = True
                break
            if attempt + 1 < self.tries:
                self.sleep(0.5)
        if not ok:
            log.warning("%s is busy: detaching it lazily", point)
            ok = self.run(["umount", "-l", point], timeout=60).ok
        if point in self.stack:
            self.stack.remove(point)
        if not ok:
            log.error("could not unmount %s", point)
        return ok

    def unmount_all(self) -> list[str]:
        """Unmount everything, newest first; the mount points that stayed."""
        failed = []
        while self.stack:
            point = self.stack[-1]
            if not self.unmount(point):
                failed.append(point)
        return failed

    def clear(self, path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> None:
        """Unmount what an earlier run left at or below ``path``."""
        for point in mounts_under(path, mounts_file):
            log.warning("%s: left mounted by an earlier run: unmounting it", point)
            self.unmount(point)

    def __enter__(self) -> Mounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount_all()


def mount_layout(mounts: Mounts, layout: Layout, target: Path) -> None:
    """Mount the layout's filesystems under ``target``, parents before children."""
    order = sorted(
        (v for v in layout.volumes if v.mounted),
        key=lambda v: (v.mount.rstrip("/").count("/"), v.mount),
    )
    for v in order:
        point = target / v.mount.lstrip("/")
        mounts.mount(v.device, point, fstype=v.kernel_fstype)
