"""Running programs inside an image's root tree, and the mounts they need there.

Package maintainer scripts expect a running system: ``/proc``, ``/sys``, ``/dev`` with
``/dev/pts``, and a ``/run`` to write to. :func:`mounted` provides them for the duration of
a ``with`` block and takes them all away again on every way out of it (a failure, Ctrl-C),
checking ``/proc/self/mountinfo`` afterwards: a mount left under a tree that is later
deleted would take the host's ``/dev`` with it. :func:`cleanup_mounts` is the same sweep
for crash recovery, when a previous process died before it could unmount.

Every mount is private (``--make-private``): on a host whose ``/`` is a shared mount
(systemd's default) a bind of ``/dev`` would otherwise join the host's peer group, and the
``devpts`` mounted inside it would show up on the host's ``/dev/pts`` too.

:func:`chroot_run` runs one command inside the tree through :func:`corral.run.run`, with
daemons kept from starting (``policy-rc.d``) and debconf non-interactive.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Protocol

from corral.errors import CommandFailed, CorralError
from corral.run import run, stop_pids

log = logging.getLogger("corral.images")

MOUNTINFO = Path("/proc/self/mountinfo")

#: The environment of every command run inside a root tree (on top of run()'s own).
CHROOT_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TMPDIR": "/tmp",
    "LANG": "C",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}

POLICY_RC_D = "usr/sbin/policy-rc.d"
_POLICY_MARKER = "# corral: no daemon starts while an image is built"
_POLICY_SCRIPT = f"#!/bin/sh\n{_POLICY_MARKER}\nexit 101\n"


class MountError(CorralError):
    """A mount that could not be made, or could not be taken away again."""


class Runner(Protocol):
    """The signature of :func:`corral.run.run` (tests pass a fake)."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]: ...


# --- the mount table -------------------------------------------------------------------


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points(mountinfo: Path = MOUNTINFO) -> list[str]:
    """Every mount point of this process's mount namespace, in the table's order."""
    points = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(_unescape(fields[4]))
    return points


def _is_under(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


def active_mounts_under(root: Path, mountinfo: Path = MOUNTINFO) -> list[str]:
    """The mount points strictly below ``root``, in mount order (stacked mounts repeat)."""
    top = str(Path(root).resolve())
    return [point for point in mount_points(mountinfo) if _is_under(point, top)]


def _deepest_first(points: Sequence[str]) -> list[str]:
    """Children before their parents; of equal depth, the most recent mount first."""
    order = sorted(enumerate(points), key=lambda item: (item[1].count("/"), item[0]))
    return [point for _, point in reversed(order)]


def _unmount(target: str, runner: Runner, mountinfo: Path) -> bool:
    """Unmount ``target`` once, lazily if it is busy. True when that worked."""
    attempts: list[list[str]] = [["umount", target], ["umount", "--lazy", target]]
    before = mount_points(mountinfo).count(target)
    for argv in attempts:
        try:
            runner(argv)
            return True
        except CommandFailed as exc:
            log.debug("%s: %s", " ".join(argv), exc)
            if mount_points(mountinfo).count(target) < before:
                return True  # it went away anyway (interrupted umount, racing cleanup)
    return False


def cleanup_mounts(root: Path, *, runner: Runner = run, mountinfo: Path = MOUNTINFO) -> list[str]:
    """Unmount everything below ``root`` (deepest first, lazily if busy).

    For crash recovery: a build that was killed may have left ``/proc``, ``/dev``... of its
    tree mounted. Returns what was unmounted; raises :class:`MountError` if something stays.
    """
    done: list[str] = []
    for _ in range(64):
        points = active_mounts_under(root, mountinfo)
        if not points:
            return done
        target = _deepest_first(points)[0]
        if not _unmount(target, runner, mountinfo):
            break
        done.append(target)
    left = active_mounts_under(root, mountinfo)
    if left:
        raise MountError(
            f"could not unmount {len(left)} mount(s) under {root}: {', '.join(left)}",
            f"stop the processes using them ('fuser -vm {left[-1]}') and run 'umount -R {root}'",
        )
    return done


# --- Ctrl-C while cleaning up ----------------------------------------------------------


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block is done, then raise KeyboardInterrupt.

    Cleanup (unmounting, removing a half-built tree) must not be cut short by an impatient
    second Ctrl-C. Only the main thread can handle signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if received:
        raise KeyboardInterrupt


# --- mounting a root tree --------------------------------------------------------------


def _mount_point(root: Path, relative: str, mode: int = 0o755) -> Path:
    """``root/relative``, created if missing, refusing anything that leads out of ``root``."""
    path = root / relative.strip("/")
    if path.is_symlink():
        raise MountError(
            f"refusing to mount on {path}: it is a symbolic link",
            "a mount point inside an image must be a real directory",
        )
    if not path.exists():
        path.mkdir(mode=mode, parents=True)
    real = path.resolve()
    if real != root and not _is_under(str(real), str(root)):
        raise MountError(
            f"refusing to mount on {path}: it leads to {real}, outside {root}",
            "a mount point inside an image must be a real directory",
        )
    if not real.is_dir():
        raise MountError(f"cannot mount on {path}: not a directory")
    return real


#: A devpts of its own: the tree's ptys are not the host's.
DEVPTS_OPTIONS = "newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec"


def mount_commands(root: Path, binds: Mapping[str, Path] | None = None) -> list[list[str]]:
    """The ``mount`` commands :func:`mounted` runs for ``root``, in order (no side effects).

    ``binds`` maps a directory inside the tree (``/var/cache/apt/archives``) to a host
    directory bound there, such as a package cache kept between builds.
    """
    r = str(root)
    argvs = [
        [*shlex.split("mount -t proc -o nosuid,nodev,noexec --make-private proc"), f"{r}/proc"],
        [*shlex.split("mount -t sysfs -o ro,nosuid,nodev,noexec --make-private sysfs"), f"{r}/sys"],
        [*shlex.split("mount --bind --make-private /dev"), f"{r}/dev"],
        [
            *shlex.split(f"mount -t devpts -o {DEVPTS_OPTIONS} --make-private devpts"),
            f"{r}/dev/pts",
        ],
        [*shlex.split("mount -t tmpfs -o mode=0755,nosuid,nodev --make-private tmpfs"), f"{r}/run"],
    ]
    for inside, host in (binds or {}).items():
        argvs.append(["mount", "--bind", "--make-private", str(host), f"{r}/{inside.strip('/')}"])
    return argvs


_MODES = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "dev/pts": 0o755, "run": 0o755}


@contextmanager
def mounted(
    root: Path,
    *,
    binds: Mapping[str, Path] | None = None,
    runner: Runner = run,
    mountinfo: Path = MOUNTINFO,
) -> Iterator[Path]:
    """Mount ``/proc``, ``/sys``, ``/dev``, ``/dev/pts``, a tmpfs on ``/run`` (and ``binds``)
    into ``root``; yield the resolved root; unmount them all on the way out.

    On leaving, by any path (an exception, KeyboardInterrupt, ``GeneratorExit``), every mount
    made here is taken away in reverse order, lazily if busy, and so is every mount that
    appeared below ``root`` meanwhile (a package script mounting ``binfmt_misc``, say).
    Ctrl-C during that cleanup is held back until it is done. Raises :class:`MountError`
    if the mount table still shows something new below ``root`` afterwards.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MountError(f"cannot mount into {root}: no such directory")
    for inside, host in (binds or {}).items():
        if not Path(host).is_dir():
            raise MountError(f"cannot bind {host} on {inside} in {root}: no such directory")
    before = Counter(active_mounts_under(root, mountinfo))
    ours: list[str] = []
    try:
        for argv in mount_commands(root, binds):
            target = argv[-1]
            relative = target[len(str(root)) + 1 :]
            _mount_point(root, relative, _MODES.get(relative, 0o755))
            try:
                runner(argv)
            except CommandFailed as exc:
                raise MountError(
                    f"cannot mount {relative} in {root}: {exc.stderr.strip() or exc}",
                    "building images needs root (mount, chroot)",
                ) from exc
            ours.append(target)
        yield root
    finally:
        with sigint_deferred():
            _teardown(root, ours, before, runner, mountinfo)


def _teardown(
    root: Path, ours: list[str], before: Counter[str], runner: Runner, mountinfo: Path
) -> None:
    def new_mounts() -> list[str]:
        left = Counter(before)
        fresh = []
        for point in active_mounts_under(root, mountinfo):
            if left[point] > 0:
                left[point] -= 1
            else:
                fresh.append(point)
        return fresh

    for target in reversed(ours):
        for inner in _deepest_first([p for p in new_mounts() if _is_under(p, target)]):
            _unmount(inner, runner, mountinfo)
        if target in new_mounts() and not _unmount(target, runner, mountinfo):
            log.warning("could not unmount %s", target)
    for stray in _deepest_first(new_mounts()):
        _unmount(stray, runner, mountinfo)
    left = new_mounts()
    if left:
        raise MountError(
            f"mounts left under {root}: {', '.join(left)}",
            f"stop the processes using them ('fuser -vm {left[-1]}') and run 'umount -R {root}'",
        )


# --- running commands inside -----------------------------------------------------------


@contextmanager
def daemons_disabled(root: Path) -> Iterator[None]:
    """A ``policy-rc.d`` that forbids starting services, for the duration of the block.

    Nested uses (and a tree that is not Debian-like, without ``/usr/sbin``) are left alone;
    a ``policy-rc.d`` the image already had is put back afterwards.
    """
    sbin = root / "usr/sbin"
    path = root / POLICY_RC_D
    if not sbin.is_dir() or (path.is_file() and _POLICY_MARKER in path.read_text()):
        yield
        return
    saved = path.with_name("policy-rc.d.corral-saved")
    had_one = path.exists() or path.is_symlink()
    if had_one:
        path.rename(saved)
    path.write_text(_POLICY_SCRIPT)
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if had_one:
            saved.rename(path)


def chroot_command(root: Path, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``root``."""
    return ["chroot", str(root), *argv]


def chroot_run(
    root: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    input: str | None = None,
    runner: Runner = run,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``root`` (with :func:`chroot_command`) through corral's run().

    Services are kept from starting, debconf asks nothing, messages are in English
    (:data:`CHROOT_ENV`, plus ``env``). The caller mounts what the command needs.
    """
    with daemons_disabled(root):
        return runner(
            chroot_command(root, argv),
            check=check,
            env={**CHROOT_ENV, **(env or {})},
            timeout=timeout,
            input=input,
        )


def interactive_shell(root: Path, shell: str = "/bin/bash") -> int:
    """``corral image shell``: a login shell inside ``root``, with its mounts; its exit code."""
    root = Path(root).resolve()
    if not (root / shell.lstrip("/")).exists():
        shell = "/bin/sh"
    env = dict(CHROOT_ENV)
    env.pop("DEBIAN_FRONTEND")  # a person is there to answer
    env.pop("DEBCONF_NONINTERACTIVE_SEEN")
    env["TERM"] = os.environ.get("TERM", "dumb")
    env["PS1"] = f"(image {root.name}) \\u@\\h:\\w\\$ "
    with mounted(root), daemons_disabled(root), _keyboard_to_child():
        # Deliberately not corral.run.run(): that one closes stdin and captures the output,
        # and a shell needs the terminal itself (stdin, stdout, stderr and Ctrl-C).
        proc = subprocess.run(chroot_command(root, [shell]), env=env, check=False)
    return proc.returncode


@contextmanager
def _keyboard_to_child() -> Iterator[None]:
    """Let Ctrl-C and Ctrl-\\ reach the shell only, not end corral (and the shell with it).

    A handler that does nothing, not SIG_IGN: the child gets the default back at exec,
    whereas an ignored signal would stay ignored in everything the shell starts.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def nothing(signum: int, frame: FrameType | None) -> None:
        pass

    previous = {sig: signal.signal(sig, nothing) for sig in (signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# --- processes left inside a tree ------------------------------------------------------


def processes_inside(root: Path) -> list[int]:
    """Process ids whose root directory or working directory is ``root`` or below it."""
    top = str(Path(root).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(entry / link)
            except OSError:
                continue
            if target == top or _is_under(target, top):
                found.append(int(entry.name))
                break
    return found


def kill_processes_inside(root: Path, wait: float = 5.0) -> list[int]:
    """Kill what still runs inside ``root`` (a killed build's orphans); wait for them.
    Returns the survivors."""
    pids = processes_inside(root)
    for pid in pids:
        log.warning("killing process %d left inside %s", pid, root)
    return stop_pids(pids, grace=0.0, kill_wait=wait)
