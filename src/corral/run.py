"""The one door through which corral starts other programs.

argv lists only, stdin closed, a small allow-listed environment; a failure raises
:class:`CommandFailed` carrying the command, its exit code and the tail of stderr.
A process started with :func:`spawn` is ended with :func:`stop`; processes known only by
their pid with :func:`stop_pids`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from corral.errors import CommandFailed, CorralError

log = logging.getLogger(__name__)

_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind the program as Ctrl-C does (:class:`KeyboardInterrupt`), so that
    its ``finally`` blocks run on the way out: a build unmounts its chroot, a bench takes
    its testbed down."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion and return its captured output."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_environment(env),
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CorralError(
            f"program not found: {args[0]}", "run 'make setup' to install corral's dependencies"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(args, -1, f"timed out after {timeout} s") from exc
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, proc.stderr)
    return proc


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.PIPE,
) -> subprocess.Popen[bytes]:
    """Start a long-running program (a daemon kept in the foreground) and return it.

    The caller owns the process: it must end it with :func:`stop`.
    """
    args = [str(a) for a in argv]
    log.debug("+ %s &", shlex.join(args))
    try:
        return subprocess.Popen(
            args, stdin=stdin, stdout=stdout, stderr=stderr, env=_environment(env)
        )
    except FileNotFoundError as exc:
        raise CorralError(
            f"program not found: {args[0]}", "run 'make setup' to install corral's dependencies"
        ) from exc


def pid_alive(pid: int) -> bool:
    """True for a live process; False for a gone one or a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold any byte.
    end = stat.rfind(b")")
    return stat[end + 2 : end + 3] not in (b"Z", b"X", b"")


def stop(
    proc: subprocess.Popen[Any],
    grace: float = 5.0,
    *,
    reap: float | None = None,
    name: str | None = None,
) -> int:
    """End ``proc`` if it still runs: SIGTERM, then SIGKILL after ``grace`` s; reap it.

    ``reap`` bounds the wait after SIGKILL (None: as long as it takes; a process in
    uninterruptible sleep can outlive SIGKILL for a while). ``name`` is the program the
    warning of a kill names (default: the first word of its command, which is ``ip``
    for one run in a network namespace). Returns its exit status.
    """
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        if name is None:
            first = proc.args[0] if isinstance(proc.args, list | tuple) else proc.args
            name = os.path.basename(str(first))
        log.warning("%s (pid %d) ignored SIGTERM for %g s: killing it", name, proc.pid, grace)
        proc.kill()
        return proc.wait(reap)


def stop_pids(pids: Sequence[int], grace: float = 5.0, kill_wait: float = 2.0) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those still running after ``grace`` s, wait up to
    ``kill_wait`` s for them; returns the survivors (processes not started by
    :func:`spawn`: a namespace's or a chroot's leftovers).

    A zombie counts as ended and is left to its parent to reap, so that a ``Popen``
    that started it still gets its exit status.
    """
    left = [p for p in dict.fromkeys(pids) if p != os.getpid()]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left:
            left = [p for p in left if pid_alive(p)]  # a zombie counts as ended
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not left:
            return []
    log.warning("processes %s survive SIGKILL", left)
    return left
