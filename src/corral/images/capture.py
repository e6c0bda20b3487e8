"""Capturing an image from a running machine: its root tree, copied over rsync and SSH.

``corral image capture NODE --name NAME`` makes the next version of ``NAME`` from a golden
node set up by hand. It runs in three steps:

1. One SSH call (:func:`probe`) checks what would otherwise fail halfway with a worse
   message (the node answers, takes the login, has rsync, has the source directory) and
   reads the node's mount table and swap files.
2. rsync copies the tree into a staging directory inside the store. When the image has a
   version already, the staging tree starts as a copy of it (``cp --reflink``: almost
   free on btrfs and XFS, a local copy elsewhere), so a recapture sends only what changed.
3. The tree loses the node's identity (:func:`corral.images.build.tree.strip_identity`, as
   every other way into the store) and becomes the version in one rename
   (:meth:`ImageStore.add_version`); the manifest then records where it came from.

Whatever stops it before the rename (an error, Ctrl-C, SIGTERM) removes the staging
directory; a capture killed outright leaves it in ``<store>/.tmp`` for
:meth:`ImageStore.gc`. No half version is ever visible.

The rsync options, and why (:func:`rsync_argv`):

- ``-aHAX --numeric-ids``: modes, times, owners as numbers (the node's uids, not this
  machine's names), hard links, ACLs and xattrs (file capabilities such as ping's
  ``cap_net_raw`` and SELinux labels live there), devices and symlinks as they are.
- ``-x`` with one source per disk filesystem. ``-x`` alone stops at every mount point, so a
  node with a separate ``/boot``, ``/boot/efi`` or ``/var`` would come back without its
  kernel; no ``-x`` walks into NFS homes, snap squashfs, container overlays and every
  tmpfs. So every filesystem below the source that lives on a disk (:data:`DISK_FILESYSTEMS`)
  and is not a bind view of one already copied is one more source (``-R`` with
  ``SRC/./boot`` keeps its place in the tree); every other mount point comes back as the
  empty directory ``-x`` leaves. (``-x`` also stops at btrfs subvolumes that are not mounted.)
- ``--delete --delete-excluded``: with the staging tree seeded from the last version, the
  result is still exactly the node's tree, as if copied into an empty directory.
- ``--no-inc-recursive``: the whole file list is known before the first byte, so the
  progress percentage means something (it costs about 100 bytes of memory a file).
- ``--sparse``: VM disks and preallocated files stay sparse.

SSH runs with ``BatchMode`` (never a prompt), a connect timeout and keep-alives (a node
that dies mid-copy fails the capture within a minute), and its own known-hosts file
in corral's home with ``StrictHostKeyChecking=accept-new``: a node's host key is trusted on
first capture and checked afterwards, without touching the admin's ``~/.ssh``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from corral.errors import CommandFailed
from corral.images.build.errors import DiskFull
from corral.images.build.tree import discard, strip_identity
from corral.images.chroot import Runner
from corral.images.store import (
    ImageError,
    ImageStore,
    ImageVersion,
    check_name,
    copy_tree,
    flocked,
    read_manifest,
    remove_tree,
    write_manifest,
)
from corral.inventory.schema import NodeSpec
from corral.run import run, spawn, stop

log = logging.getLogger("corral.images")

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

#: File systems that hold data on a disk of the node: captured when mounted below the
#: source. Everything else (nfs, cifs, fuse, tmpfs, overlay, squashfs...) is a mount point.
DISK_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs", "jfs", "reiserfs", "zfs", "bcachefs"}
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

_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_SECTION = "@@corral-capture@@"
_NO_RSYNC, _NO_SOURCE = 97, 98


# --- errors ----------------------------------------------------------------------------


class CaptureError(ImageError):
    """A capture that failed during the copy (no version was added)."""


class SourceError(CaptureError):
    """The machine to capture cannot be used as given: unreachable, login refused, no rsync
    there, no such directory, a node without an address (nothing was copied)."""

    exit_code = 2


# --- where from ------------------------------------------------------------------------


def is_address(text: str) -> bool:
    """Whether ``text`` is a literal IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def node_address(node: NodeSpec) -> str:
    """The address to reach an inventory node at: its first interface with an IP."""
    for interface in node.interfaces:
        if interface.ip:
            return str(interface.ip)
    raise SourceError(
        f"node '{node.name}' has no IP address in the inventory",
        f"give it one ('corral node set {node.name} --ip ADDRESS') or capture by address",
    )


@dataclass(frozen=True)
class Source:
    """The machine and directory to capture, and how to log in there.

    ``node`` is the inventory node ``host`` was looked up from (None: given literally).
    ``known_hosts`` is the file SSH trusts host keys from and adds new ones to (None: the
    user's own).
    """

    host: str
    path: str = "/"
    user: str = "root"
    port: int = 22
    key: Path | None = None
    known_hosts: Path | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        if not (is_address(self.host) or _HOST_NAME.fullmatch(self.host)):
            hint = "give an inventory node, a host name or an IP address"
            if "@" in self.host:
                hint = "give the login with --user, not as USER@HOST"
            raise SourceError(f"invalid host {self.host!r}", hint)
        if not _USER.fullmatch(self.user):
            raise SourceError(f"invalid user name {self.user!r}")
        if not 1 <= self.port <= 65535:
            raise SourceError(f"invalid SSH port {self.port}", "use 1 to 65535")
        if not self.path.startswith("/") or "\n" in self.path or "\0" in self.path:
            raise SourceError(
                f"invalid source path {self.path!r}", "give an absolute path on the node"
            )
        object.__setattr__(self, "path", posixpath.normpath(self.path).replace("//", "/"))

    @property
    def where(self) -> str:
        """``user@host`` (and the port when it is not 22), for messages."""
        port = f" port {self.port}" if self.port != 22 else ""
        return f"{self.user}@{self.host}{port}"

    @property
    def known_hosts_name(self) -> str:
        """How the host appears in a known-hosts file (``[host]:port`` off port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def rsync_source(self, relative: str = "") -> str:
        """An rsync source argument for the directory ``relative`` (below the source path),
        with the ``/./`` that ``-R`` keeps the path after."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = self.path.rstrip("/")
        return f"{self.user}@{host}:{base}/./{relative}"


# --- the commands ----------------------------------------------------------------------


def ssh_argv(source: Source) -> list[str]:
    """The ``ssh`` command (without destination) that every connection of a capture uses."""
    argv = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    if source.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={source.known_hosts}"]
    argv += ["-p", str(source.port)]
    if source.key is not None:
        argv += ["-i", str(source.key), "-o", "IdentitiesOnly=yes"]
    return argv


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


def _rsync_escape(path: str) -> str:
    """A literal path as an rsync pattern (``*``, ``?``, ``[`` and ``\\`` are wildcards)."""
    return re.sub(r"([*?\[\\])", r"\\\1", path)


def swap_excludes(swaps: str, source_path: str) -> list[str]:
    """Exclude patterns for the swap files of a ``/proc/swaps`` text below the source."""
    patterns: list[str] = []
    for line in swaps.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "file":
            relative = _below(_unescape(fields[0]), source_path)
            if relative is not None:
                patterns.append("/" + _rsync_escape(relative))
    return patterns


@dataclass(frozen=True)
class Probe:
    """What the first SSH call learnt about the node."""

    hostname: str
    mounts: list[str]  # disk filesystems below the source, relative to it
    swap_excludes: list[str]


def explain_ssh(stderr: str, source: Source) -> SourceError:
    """The error for an SSH connection that failed (ssh exits 255), naming the fix."""
    text = stderr.strip()
    where = source.where
    if re.search(r"Could not resolve hostname|Name or service not known|name resolution", text):
        hint = "check the node's address in the inventory ('corral node show NAME')"
        if source.node is None:
            hint = (
                f"'{source.host}' is neither an inventory node nor a name this machine "
                "resolves: see 'corral node list', or give an IP address"
            )
        return SourceError(f"cannot capture from {where}: unknown host", hint)
    if "Connection refused" in text:
        return SourceError(
            f"cannot capture from {where}: connection refused",
            f"is sshd running on the node, on port {source.port}? (--ssh-port)",
        )
    reachability = re.search(
        r"Connection timed out|Operation timed out|No route to host|Network is unreachable", text
    )
    if reachability:
        return SourceError(
            f"cannot capture from {where}: {reachability.group(0).lower()}",
            f"check that the node is up and that this machine reaches it (ping {source.host})",
        )
    if "IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        where_file = f" -f {source.known_hosts}" if source.known_hosts is not None else ""
        return SourceError(
            f"cannot capture from {where}: its SSH host key is not the one seen before",
            "if the node was reinstalled, forget the old key: "
            f"ssh-keygen -R '{source.known_hosts_name}'{where_file}",
        )
    if "Permission denied" in text or "Too many authentication failures" in text:
        key = f"{source.key} was refused" if source.key else "no --ssh-key was given"
        return SourceError(
            f"cannot capture from {where}: the node refused the login ({key})",
            f"give a key that {source.user}@{source.host} accepts (in its authorized_keys) "
            "with --ssh-key FILE, or another login with --user",
        )
    tail = " | ".join(text.splitlines()[-3:]) or "no message"
    return SourceError(f"cannot capture from {where}: ssh failed: {tail}")


def probe(source: Source, runner: Runner = run) -> Probe:
    """Check the node is usable, and read its hostname, mounts and swap files."""
    argv = [*ssh_argv(source), "-l", source.user, source.host, probe_command(source)]
    try:
        proc = runner(argv, check=False, env=_ssh_env(), timeout=120)
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


def _ssh_env() -> dict[str, str]:
    """run() passes a small environment; ssh also needs the agent, if there is one."""
    env = {"LC_ALL": "C"}
    if "SSH_AUTH_SOCK" in os.environ:
        env["SSH_AUTH_SOCK"] = os.environ["SSH_AUTH_SOCK"]
    return env


# --- running rsync ---------------------------------------------------------------------

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


# --- the capture -----------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureResult:
    """A captured version and what the copy took."""

    version: ImageVersion
    seconds: float
    received_bytes: int | None
    files_transferred: int | None
    seeded_from: str | None
    filesystems: list[str] = field(default_factory=list)


StepCallback = Callable[[str], None]


def capture(
    store: ImageStore,
    name: str,
    source: Source,
    excludes: Sequence[str] = (),
    *,
    on_step: StepCallback | None = None,
    on_progress: ProgressCallback | None = None,
    runner: Runner = run,
    transfer: Transfer = run_rsync,
) -> CaptureResult:
    """Copy ``source``'s tree into the next version of ``name`` (see the module docs)."""
    check_name(name)
    step = on_step or (lambda text: None)
    started = time.monotonic()
    started_at = _now()
    for program, package in (("rsync", "rsync"), ("ssh", "openssh-client")):
        if shutil.which(program) is None:
            raise CaptureError(
                f"{program} is not installed on this machine",
                f"install it: apt-get install {package} ('make setup' does)",
            )
    if source.known_hosts is not None:
        source.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    step("connecting")
    found = probe(source, runner)
    own = [f"/{_rsync_escape(m)}/lost+found" for m in found.mounts]  # each mkfs makes one
    patterns = excludes_for(excludes, [*own, *found.swap_excludes])
    tmp_root = store.root / ".tmp"  # where ImageStore.gc() finds what a killed capture left
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".capture-{name}.", suffix=f".tmp-{os.getpid()}", dir=tmp_root)
    )
    seed: ImageVersion | None = None
    try:
        tree = staging / "rootfs"
        if name in store.names():
            seed = store.get(name)
            step(f"starting from {seed.ref}")
            copy_tree(seed.rootfs, tree)
        else:
            tree.mkdir(mode=0o755)
        step("copying")
        argv = rsync_argv(source, tree, patterns, found.mounts)
        outcome = transfer(argv, env=_ssh_env(), on_progress=on_progress)
        check_rsync_outcome(outcome, source, store)
        if outcome.returncode == RSYNC_VANISHED:
            log.warning("%s: some files vanished during the copy", source.host)
        strip_identity(tree)
        step("adding the version")
        origin = f"capture {source.where}:{source.path}"
        version = store.add_version(name, tree, origin=origin, move=True)
    finally:
        discard(staging)  # stops whatever still runs in it, then empties it
        remove_tree(staging)
    filesystems = ["/", *(f"/{m}" for m in found.mounts)]
    record = {
        "host": source.host,
        "node": source.node,
        "hostname": found.hostname,
        "user": source.user,
        "port": source.port,
        "source_path": source.path,
        "filesystems": filesystems,
        "excludes": patterns,
        "started": started_at,
        "finished": _now(),
        "seeded_from": seed.ref if seed else None,
        "received_bytes": outcome.received_bytes,
        "files_transferred": outcome.files_transferred,
        "vanished_files": outcome.returncode == RSYNC_VANISHED,
    }
    version = record_capture(version, record)
    return CaptureResult(
        version=version,
        seconds=time.monotonic() - started,
        received_bytes=outcome.received_bytes,
        files_transferred=outcome.files_transferred,
        seeded_from=seed.ref if seed else None,
        filesystems=filesystems,
    )


def record_capture(version: ImageVersion, record: dict[str, Any]) -> ImageVersion:
    """Add ``capture`` to the version's manifest (its ``origin`` says so already).

    Under the lock :func:`corral.images.exports.build_exports` holds around its own
    read-modify-write of the manifest, so neither loses the other's change.
    """
    version.exports_dir.mkdir(exist_ok=True)
    with flocked(version.exports_dir / ".lock"):
        manifest = read_manifest(version.path)
        manifest["capture"] = record
        write_manifest(version.path, manifest)
    return ImageVersion.load(version.path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
