"""The first SSH call of a capture: it checks what would otherwise fail halfway with a worse
message (the node answers, takes the login, has rsync, has the source directory) and
reads the node's mount table and swap files, which decide what the copy takes."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from corral.errors import CommandFailed
from corral.images.capture.errors import SourceError
from corral.images.capture.rsync import rsync_escape
from corral.images.capture.source import Source, explain_ssh, ssh_argv, ssh_env
from corral.images.chroot import Runner
from corral.run import run

#: File systems that hold data on a disk of the node: captured when mounted below the
#: source. Everything else (nfs, cifs, fuse, tmpfs, overlay, squashfs...) is a mount point.
DISK_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs", "jfs", "reiserfs", "zfs", "bcachefs"}
)

_SECTION = "@@corral-capture@@"
_NO_RSYNC, _NO_SOURCE = 97, 98


def probe_command(source: Source) -> str:
    """What the first SSH call runs on the node (a POSIX shell command line)."""
    return "; ".join(
        [
            f"command -v rsync >/dev/null 2>&1 || exit {_NO_RSYNC}",
            f"test -d {shlex.quote(source.path)} || exit {_NO_SOURCE}",
            "uname -n",
            f"echo {_SECTION}",
            "cat /proc/self/mountinfo",
            f"echo {_SECTION}",
            "cat /proc/swaps 2>/dev/null",
            "exit 0",
        ]
    )


# --- what the node says ----------------------------------------------------------------


def _unescape(field_text: str) -> str:
    """The kernel writes blanks and backslashes in mount and swap paths as ``\\NNN``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def _below(path: str, base: str) -> str | None:
    """``path`` relative to ``base`` when strictly below it (else None)."""
    if base == "/":
        return path[1:] or None
    if path.startswith(base + "/"):
        return path[len(base) + 1 :]
    return None


def _contains(path: str, base: str) -> bool:
    return path == base or base == "/" or path.startswith(base.rstrip("/") + "/")


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: what is mounted where."""

    device: str  # major:minor
    root: str  # the directory of that filesystem mounted here ("/" unless a bind)
    target: str
    fstype: str


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount of a ``mountinfo`` text, in its order (a later one over the same target
    hides the earlier)."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        mounts.append(
            Mount(fields[2], _unescape(fields[3]), _unescape(fields[4]), fields[dash + 1])
        )
    return mounts


def disk_mounts(mounts: Sequence[Mount], source_path: str) -> list[str]:
    """The disk filesystems mounted below ``source_path`` that the copy must add as sources,
    relative to it, parents first.

    Left out: other file systems (and whatever is mounted below them), and bind mounts
    showing a directory of a filesystem already copied (same device, a root inside the
    root of a mount already taken). A btrfs subvolume mounted apart (``/@home``) is not a
    bind of ``/@`` and is copied.
    """
    visible = {m.target: m for m in mounts}  # the last mount on a target is the one seen
    holder = max(
        (m for m in visible.values() if _contains(source_path, m.target)),
        key=lambda m: len(m.target),
        default=None,
    )
    taken: list[Mount] = [holder] if holder is not None else []
    skipped: list[str] = []
    chosen: list[str] = []
    for mount in sorted(visible.values(), key=lambda m: m.target.count("/")):
        relative = _below(mount.target, source_path)
        if relative is None:
            continue
        if any(_contains(mount.target, s) for s in skipped) or mount.fstype not in DISK_FILESYSTEMS:
            skipped.append(mount.target)
            continue
        if any(t.device == mount.device and _contains(mount.root, t.root) for t in taken):
            continue
        taken.append(mount)
        chosen.append(relative)
    return chosen


def swap_excludes(swaps: str, source_path: str) -> list[str]:
    """Exclude patterns for the swap files of a ``/proc/swaps`` text below the source."""
    patterns: list[str] = []
    for line in swaps.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "file":
            relative = _below(_unescape(fields[0]), source_path)
            if relative is not None:
                patterns.append("/" + rsync_escape(relative))
    return patterns


@dataclass(frozen=True)
class Probe:
    """What the first SSH call learnt about the node."""

    hostname: str
    mounts: list[str]  # disk filesystems below the source, relative to it
    swap_excludes: list[str]


def probe(source: Source, runner: Runner = run) -> Probe:
    """Check the node is usable, and read its hostname, mounts and swap files."""
    argv = [*ssh_argv(source), "-l", source.user, source.host, probe_command(source)]
    try:
        proc = runner(argv, check=False, env=ssh_env(), timeout=120)
    except CommandFailed as exc:  # a timeout
        raise SourceError(
            f"cannot capture from {source.where}: no answer within 120 s",
            "check that the node is up and its sshd works ('ssh' to it by hand)",
        ) from exc
    if proc.returncode == 255:
        raise explain_ssh(proc.stderr, source)
    if proc.returncode == _NO_RSYNC:
        raise SourceError(
            f"rsync is not installed on {source.host}",
            "install it there: apt-get install rsync (dnf install rsync on RHEL-like systems)",
        )
    if proc.returncode == _NO_SOURCE:
        raise SourceError(
            f"no directory {source.path} on {source.host}",
            "check --source-path (a directory on the node)",
        )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise SourceError(
            f"cannot capture from {source.where}: the check on the node failed "
            f"(exit code {proc.returncode}): {tail}",
            "the login shell must be a POSIX shell",
        )
    head, _, rest = proc.stdout.partition(_SECTION + "\n")
    mountinfo, _, swaps = rest.partition(_SECTION + "\n")
    return Probe(
        hostname=head.strip(),
        mounts=disk_mounts(parse_mountinfo(mountinfo), source.path),
        swap_excludes=swap_excludes(swaps, source.path),
    )
