"""The agent's one door to the programs it runs (sfdisk, mkfs, mount, zstd, tar, rsync,
udp-receiver, udhcpc...): argv lists only, stdin closed unless fed.

Commands that run to their end go through a :data:`Runner` (tests give a fake one that
records them); :class:`SubprocessRunner` is the real one and returns a :class:`Result`
whose :meth:`~Result.reason` is the one-line complaint a failure reports; :func:`check`
raises it as :class:`CommandFailed` where the installation cannot go on without the
command. Programs that run alongside the agent (a pipeline it feeds, a receiver it reads)
start with :func:`spawn` and end with :func:`stop`.

The server's :mod:`corral.run` does the same for corral's side; the agent cannot import
it (it is stdlib-only and copied alone into the ramdisk).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from corral.agent.errors import Cancelled, InstallError

log = logging.getLogger("corral.agent")

#: What a spawned program's stdin, stdout or stderr can be: a ``subprocess`` constant
#: (PIPE, DEVNULL, STDOUT), a file, or None to share the agent's.
Stream = int | IO[Any] | None


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def reason(self) -> str:
        """``mkfs.ext4 exited with 1: <its last line of complaint>``."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        name = os.path.basename(self.argv[0]) if self.argv else "?"
        if self.returncode == 127:
            return f"{name}: command not found"
        if self.returncode == 124:
            return f"{name} did not finish in time"
        last = f": {text[-1].strip()}" if text else ""
        return f"{name} exited with {self.returncode}{last}"


class CommandFailed(InstallError):
    """A program the installer ran exited non-zero; the message is the one-line reason.

    The agent's :class:`corral.errors.CommandFailed` (which it cannot import)."""

    def __init__(self, result: Result, what: str = "") -> None:
        super().__init__(f"{what}: {result.reason()}" if what else result.reason())
        self.result = result


def check(result: Result, what: str = "") -> Result:
    """``result`` if its command succeeded, else :class:`CommandFailed` (``what: reason``)."""
    if not result.ok:
        raise CommandFailed(result, what)
    return result


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> Result: ...


def run_while_held(
    run: Runner,
    argv: Sequence[str],
    *,
    held: str,
    tries: int,
    sleep: Callable[[float], None] = time.sleep,
    note: str = "",
    input: str | None = None,
    timeout: float = 600.0,
) -> Result:
    """Run ``argv``, and again half a second later while it fails saying ``held`` (a device
    still held for a moment: by the kernel tearing a filesystem down, or udev probing a
    partition just unmounted), at most ``tries`` times in all; the last result.

    ``note``, if given, is logged before each new try."""
    result = run(argv, input=input, timeout=timeout)
    for _ in range(tries - 1):
        if result.ok or held not in result.stderr + result.stdout:
            break
        if note:
            log.info("%s", note)
        sleep(0.5)
        result = run(argv, input=input, timeout=timeout)
    return result


class SubprocessRunner:
    """Runs commands, logs their output, stops them at a timeout or a cancel.

    Returns 127 for a missing program and 124 after the timeout, as shells do, so that the
    caller's one reason covers them; raises :class:`Cancelled` when ``cancel`` is set.
    """

    def __init__(self, extra_env: Mapping[str, str] | None = None, poll: float = 0.2) -> None:
        self.extra_env = dict(extra_env or {})
        self.poll = poll

    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        args = tuple(argv)
        log.debug("+ %s", " ".join(args))
        environ = dict(env) if env is not None else dict(os.environ, **self.extra_env)
        stdin = subprocess.DEVNULL if input is None else _in_memory(input)
        try:
            proc = subprocess.Popen(
                list(args),
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                env=environ,
            )
        except FileNotFoundError:
            log.error("%s: not found", args[0])
            return Result(args, 127, "", f"{args[0]}: not found")
        finally:
            if input is not None:
                os.close(stdin)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=self.poll)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled() from None
                    if time.monotonic() > deadline:
                        proc.kill()
                        out, err = proc.communicate()
                        log.error("%s: no answer after %.0f s", args[0], timeout)
                        return Result(args, 124, out, err + f"\ntimed out after {timeout:.0f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for line in (out + err).splitlines():
            log.debug("%s: %s", os.path.basename(args[0]), line)
        if proc.returncode != 0:
            log.warning("%s exited with %d", " ".join(args), proc.returncode)
        return Result(args, proc.returncode, out, err)


def _in_memory(text: str) -> int:
    """A file descriptor of an in-memory file holding ``text``, read from its start: what a
    program is fed on its stdin.

    Not a pipe that :meth:`subprocess.Popen.communicate` writes: when its first call times
    out before it has written the input (an agent that gets no CPU for the poll's 0.2 s,
    as on a busy host), the calls after it may not pass the input again, and do not write
    the rest of it or close the pipe. The program then waits on its stdin for ever: sfdisk
    did, for its 120 s, on the testbed. A file needs nobody to feed it."""
    fd = os.memfd_create("corral-agent-stdin")
    data = text.encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def spawn(
    argv: Sequence[str],
    *,
    stdin: Stream = subprocess.DEVNULL,
    stdout: Stream = subprocess.DEVNULL,
    stderr: Stream = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` alongside the agent (the agent's environment unless ``env``) and
    return it; the caller ends it with :func:`stop`."""
    args = list(argv)
    log.debug("+ %s &", " ".join(args))
    return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, env=env)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """End ``proc`` if it still runs: SIGTERM, then SIGKILL after ``grace`` s; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
