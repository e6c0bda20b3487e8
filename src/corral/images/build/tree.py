"""What a build does to the tree itself: files written into it, its identity taken out, its
size, the lock on a package cache, and emptying it after a failure."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from corral.images.build.errors import BuildError
from corral.images.chroot import (
    MOUNTINFO,
    Runner,
    active_mounts_under,
    cleanup_mounts,
    kill_processes_inside,
    sigint_deferred,
)
from corral.images.store import flocked
from corral.images.templates import render_template
from corral.run import run

log = logging.getLogger("corral.images")


class HostDns:
    """The build host's resolver inside the tree while packages are downloaded in it.

    Installing systemd-resolved turns ``/etc/resolv.conf`` into a link to a file only a
    running resolved writes; apt inside the tree would then resolve nothing.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "etc/resolv.conf"
        self.link: str | None = None
        self.content: bytes | None = None

    def use(self) -> None:
        if self.path.is_symlink():
            self.link = os.readlink(self.path)
        elif self.path.exists():
            self.content = self.path.read_bytes()
        host = Path("/etc/resolv.conf")
        if self.path.is_symlink() or self.path.exists():
            self.path.unlink()
        self.path.write_bytes(host.read_bytes() if host.exists() else b"")

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.link is not None:
            self.path.symlink_to(self.link)
        elif self.content is not None:
            self.path.write_bytes(self.content)


def empty_dir(path: Path) -> None:
    """Remove what ``path`` holds, not ``path`` itself."""
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file of the tree; a link there is replaced, never followed out of the tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def strip_identity(root: Path) -> None:
    """Remove what makes the tree one particular machine: machine id, SSH host keys,
    hostname (and empty its scratch directories)."""
    machine_id = root / "etc/machine-id"
    machine_id.unlink(missing_ok=True)
    write_file(machine_id, "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.parent.is_dir():
        dbus_id.unlink(missing_ok=True)
        dbus_id.symlink_to("/etc/machine-id")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    write_file(root / "etc/hostname", "localhost\n")
    if not (root / "etc/hosts").exists():
        write_file(root / "etc/hosts", render_template("image-hosts.j2"))
    for scratch in ("tmp", "var/tmp"):
        empty_dir(root / scratch)


def image_size(root: Path) -> int:
    """Bytes in the files of ``root`` (each hard-linked file counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


@contextmanager
def cache_lock(cache: Path | None) -> Iterator[None]:
    """One build at a time per cache directory (debootstrap itself does not lock it)."""
    if cache is None:
        yield
        return
    with flocked(cache / ".lock"):
        yield


def discard(staging: Path, *, runner: Runner = run, mountinfo: Path = MOUNTINFO) -> None:
    """Empty ``staging`` after a failed build: processes and mounts first, then the files.

    A killed debootstrap leaves its children running inside the tree and its own ``/proc``
    mounted; they go first. Nothing is deleted while a mount remains below ``staging`` (a
    bound ``/dev`` would go with it).
    """
    with sigint_deferred():
        for attempt in range(3):
            kill_processes_inside(staging)
            cleanup_mounts(staging, runner=runner, mountinfo=mountinfo)
            left = active_mounts_under(staging, mountinfo)
            if left:  # cleanup_mounts raises first; this is the last line of defence
                raise BuildError(f"not removing {staging}: still mounted below it: {left}")
            try:
                empty_dir(staging)
                return
            except OSError as exc:  # something still running wrote meanwhile
                if attempt == 2:
                    raise BuildError(
                        f"could not empty {staging} after a failed build: {exc}",
                        f"remove it by hand once nothing runs in it ('fuser -vm {staging}')",
                    ) from exc
