"""The copy of a capture: the rsync command, its progress as it runs, and how it failed.

The rsync options, and why (:func:`rsync_argv`):

- ``-aHAX --numeric-ids``: modes, times, owners as numbers (the node's uids, not this
  machine's names), hard links, ACLs and xattrs (file capabilities such as ping's
  ``cap_net_raw`` and SELinux labels live there), devices and symlinks as they are.
- ``-x`` with one source per disk filesystem. ``-x`` alone stops at every mount point, so a
  node with a separate ``/boot``, ``/boot/efi`` or ``/var`` would come back without its
  kernel; no ``-x`` walks into NFS homes, snap squashfs, container overlays and every
  tmpfs. So every filesystem below the source that lives on a disk
  (:data:`~corral.images.capture.probe.DISK_FILESYSTEMS`) and is not a bind view of one
  already copied is one more source (``-R`` with ``SRC/./boot`` keeps its place in the
  tree); every other mount point comes back as the empty directory ``-x`` leaves. (``-x``
  also stops at btrfs subvolumes that are not mounted.)
- ``--delete --delete-excluded``: with the staging tree seeded from the last version, the
  result is still exactly the node's tree, as if copied into an empty directory.
- ``--no-inc-recursive``: the whole file list is known before the first byte, so the
  progress percentage means something (it costs about 100 bytes of memory a file).
- ``--sparse``: VM disks and preallocated files stay sparse.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from corral.images.build.errors import DiskFull
from corral.images.capture.errors import CaptureError, SourceError
from corral.images.capture.source import Source, explain_ssh, ssh_argv
from corral.images.store import ImageStore
from corral.run import spawn, stop

#: What a root tree holds that does not belong in an image: rsync patterns, anchored at the
#: source directory. ``DIR/*`` leaves out what is in a directory but keeps the directory
#: (a mount point, or a scratch directory whose mode matters, such as /tmp's 1777).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    # API and scratch file systems: mount points only.
    "/proc/*",
    "/sys/*",
    "/dev/*",
    "/run/*",
    "/tmp/*",
    "/var/tmp/*",
    "/mnt/*",
    "/media/*",
    "/lost+found",
    # The node's identity. An empty machine-id is written instead (systemd makes one at
    # first boot); the host keys never leave the node, each deployed node gets its own.
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/ssh/ssh_host_*",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/credential.secret",
    # The node's history and caches.
    "/var/log/journal/*",
    "/var/cache/apt/archives/*.deb",
    "/var/cache/apt/*.bin",
    "/var/lib/apt/lists/*",
    "/var/cache/dnf/*",
    # Swap files by their usual names (the ones in use are found in /proc/swaps too).
    "/swapfile",
    "/swap.img",
)

#: rsync's exit code for "some files vanished before they could be copied": normal on a
#: live system (rotated logs, a temporary file), not a failure.
RSYNC_VANISHED = 24

_RSYNC_CODES = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files",
    5: "error starting the client-server protocol",
    10: "error in socket I/O",
    11: "error in file I/O",
    12: "error in the rsync protocol data stream",
    20: "interrupted",
    23: "some files could not be copied",
    30: "timeout in data send/receive",
    255: "the SSH connection failed",
}


def excludes_for(extra: Sequence[str] = (), node: Sequence[str] = ()) -> list[str]:
    """The default exclusions, then the node's own (swap files, the lost+found of each
    filesystem), then the user's; each once."""
    for pattern in extra:
        if not pattern.strip() or "\n" in pattern:
            raise SourceError(f"invalid exclude pattern {pattern!r}", "give an rsync pattern")
    return list(dict.fromkeys([*DEFAULT_EXCLUDES, *node, *extra]))


def rsync_argv(
    source: Source, dest: Path, excludes: Sequence[str], mounts: Sequence[str] = ()
) -> list[str]:
    """The rsync command that copies ``source`` (and the disk filesystems mounted at
    ``mounts``, relative to it) into ``dest``; see the module documentation."""
    argv = [
        "rsync",
        "-aHAXxR",
        "--numeric-ids",
        "--sparse",
        "--delete",
        "--delete-excluded",
        "--no-inc-recursive",
        "--info=progress2",
        "--stats",
        "-e",
        shlex.join(ssh_argv(source)),  # rsync splits it on blanks and honours the quotes
    ]
    argv += [f"--exclude={pattern}" for pattern in excludes]
    argv += [source.rsync_source(), *(source.rsync_source(m) for m in mounts)]
    argv.append(f"{dest}/")
    return argv


def rsync_escape(path: str) -> str:
    """A literal path as an rsync pattern (``*``, ``?``, ``[`` and ``\\`` are wildcards)."""
    return re.sub(r"([*?\[\\])", r"\\\1", path)


_PROGRESS = re.compile(
    r"^\s*(?P<bytes>[\d,]+)\s+(?P<percent>\d+)%\s+(?P<rate>\S+/s)\s+(?P<eta>\d+:\d\d:\d\d)"
    r"(?:\s+\(xfr#(?P<files>\d+), (?:to|ir)-chk=(?P<left>\d+)/(?P<total>\d+)\))?\s*$"
)
_STATS = {
    "received": re.compile(r"^Total bytes received: ([\d,]+)"),
    "files": re.compile(r"^Number of regular files transferred: ([\d,]+)"),
}


@dataclass(frozen=True)
class Progress:
    """One ``--info=progress2`` line of rsync: the whole transfer so far."""

    bytes: int  # file data done (changed files only, on a recapture)
    percent: int
    rate: str  # as rsync prints it: "12.34MB/s"
    files_left: int | None = None
    files_total: int | None = None


def parse_progress(line: str) -> Progress | None:
    match = _PROGRESS.match(line)
    if match is None:
        return None
    left, total = match.group("left"), match.group("total")
    return Progress(
        bytes=int(match.group("bytes").replace(",", "")),
        percent=int(match.group("percent")),
        rate=match.group("rate"),
        files_left=int(left) if left is not None else None,
        files_total=int(total) if total is not None else None,
    )


@dataclass
class RsyncOutcome:
    """How an rsync run ended: its exit code, stderr and the numbers of ``--stats``."""

    returncode: int
    stderr: str = ""
    received_bytes: int | None = None
    files_transferred: int | None = None
    last: Progress | None = None


ProgressCallback = Callable[[Progress], None]


class Transfer(Protocol):
    def __call__(
        self, argv: Sequence[str], *, env: dict[str, str], on_progress: ProgressCallback | None
    ) -> RsyncOutcome: ...


def run_rsync(
    argv: Sequence[str], *, env: dict[str, str], on_progress: ProgressCallback | None = None
) -> RsyncOutcome:
    """Run rsync, passing each progress line to ``on_progress``; stop it on any way out.

    stderr goes to a temporary file rather than a pipe: a live system can make rsync
    write thousands of "file has vanished" lines, which would fill a pipe nobody reads
    until the end.
    """
    outcome = RsyncOutcome(returncode=-1)
    with tempfile.TemporaryFile() as errors:
        proc = spawn(argv, env=env, stdout=subprocess.PIPE, stderr=errors.fileno())
        try:
            assert proc.stdout is not None
            pending = b""
            while chunk := os.read(proc.stdout.fileno(), 65536):
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                for raw in lines:
                    _take_line(raw.decode(errors="replace"), outcome, on_progress)
            _take_line(pending.decode(errors="replace"), outcome, on_progress)
            outcome.returncode = proc.wait()
        finally:
            _stop(proc)
        errors.seek(0)
        outcome.stderr = errors.read().decode(errors="replace")
    return outcome


def _take_line(line: str, outcome: RsyncOutcome, on_progress: ProgressCallback | None) -> None:
    progress = parse_progress(line)
    if progress is not None:
        outcome.last = progress
        if on_progress is not None:
            on_progress(progress)
        return
    for what, pattern in _STATS.items():
        match = pattern.match(line)
        if match:
            number = int(match.group(1).replace(",", ""))
            if what == "received":
                outcome.received_bytes = number
            else:
                outcome.files_transferred = number


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate rsync if it still runs (Ctrl-C reaches it too; SIGTERM only reaches us)."""
    stop(proc, 10)
    if proc.stdout is not None:
        proc.stdout.close()


def check_rsync_outcome(outcome: RsyncOutcome, source: Source, store: ImageStore) -> None:
    """Raise the error a failed rsync deserves (vanished files are not a failure)."""
    code = outcome.returncode
    if code in (0, RSYNC_VANISHED):
        return
    text = outcome.stderr
    if "No space left on device" in text:
        raise DiskFull(store.root, f"capturing from {source.host}")
    if code == 255 or (code in (5, 10, 12) and re.search(r"ssh|Connection", text)):
        error = explain_ssh(text, source)
        raise CaptureError(f"{error.message} (during the copy)", error.hint)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-3:]) or "no message"
    meaning = _RSYNC_CODES.get(code, "failed")
    hint = None
    if code == 23:
        hint = "leave what cannot be read out with --exclude PATTERN, if it is not needed"
    raise CaptureError(f"rsync from {source.where}: {meaning} (exit code {code}): {tail}", hint)
