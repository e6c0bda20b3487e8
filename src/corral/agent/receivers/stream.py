"""The image's stream on its way into the target: checked chunk by chunk
(:class:`VerifiedStream`), unpacked by ``zstd -d | tar -x`` (:class:`Unpacker`), from a
thread of its own if need be (:class:`UnpackQueue`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers.tools import output_tail
from corral.agent.run import spawn, stop

#: ``progress(bytes_so_far, bytes_expected)``; 0 expected means unknown.
ProgressCallback = Callable[[int, int], None]
#: tar's side of the stream, as :mod:`corral.images.exports` builds it.
TAR_EXTRACT = (
    "tar",
    "-x",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "-p",
    "-f",
    "-",
)


class Sink(Protocol):
    """Where the checked chunks go, in order: :class:`Unpacker` or :class:`FileWriter`."""

    def write(self, data: bytes) -> None: ...

    def finish(self, timeout: float = 600) -> None: ...

    def abort(self) -> None: ...


class Unpacker:
    """``zstd -d | tar -x`` into a directory, fed through :meth:`write`.

    The pipe between the two is the kernel's, so the agent never holds more than the chunk
    it is writing.
    """

    def __init__(self, target_dir: Path) -> None:
        # closed by finish() or abort(): they outlive this call
        self._errors = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]  # noqa: SIM115
        self.zstd: subprocess.Popen[bytes] = spawn(
            ["zstd", "-d", "-q", "-c"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors[0],
        )
        try:
            self.tar: subprocess.Popen[bytes] = spawn(
                [*TAR_EXTRACT, "-C", str(target_dir)],
                stdin=self.zstd.stdout,
                stdout=subprocess.DEVNULL,
                stderr=self._errors[1],
                env=dict(os.environ, LC_ALL="C"),
            )
        except BaseException:
            self.abort()
            raise
        assert self.zstd.stdout is not None
        self.zstd.stdout.close()  # tar's now: zstd sees EPIPE if tar dies

    def write(self, data: bytes) -> None:
        stdin = self.zstd.stdin
        assert stdin is not None
        try:
            stdin.write(data)
        except BrokenPipeError:
            raise ReceiveError(f"unpacking stopped: {self._why()}") from None

    def _why(self) -> str:
        """Why zstd or tar ended early, after waiting a little for them to say."""
        for proc in (self.zstd, self.tar):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        parts = []
        for name, proc, errors in (
            ("zstd", self.zstd, self._errors[0]),
            ("tar", self.tar, self._errors[1]),
        ):
            if proc.returncode not in (None, 0):
                parts.append(
                    f"{name} exited with {proc.returncode}: {output_tail(errors)}".rstrip(": ")
                )
        return "; ".join(parts) or "the unpacking pipe closed"

    def finish(self, timeout: float = 600) -> None:
        """Close the input and wait for both; raise :class:`ReceiveError` unless both
        succeeded (tar's exit status is the proof every file was written)."""
        stdin = self.zstd.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError):
            stdin.close()
        try:
            self.zstd.wait(timeout)
            self.tar.wait(timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise ReceiveError(
                f"unpacking did not end {timeout:.0f} s after the last byte"
            ) from None
        try:
            if self.zstd.returncode != 0 or self.tar.returncode != 0:
                raise ReceiveError(f"unpacking failed: {self._why()}")
        finally:
            self._close_errors()

    def abort(self) -> None:
        for proc in (self.zstd, getattr(self, "tar", None)):
            if proc is not None:
                if proc.stdin is not None:
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.close()
                stop(proc)
        self._close_errors()

    def _close_errors(self) -> None:
        for f in self._errors:
            if not f.closed:
                f.close()


class FileWriter:
    """The checked stream written as it is into one file (a diskless node's squashfs),
    with the same interface as :class:`Unpacker`: a file that is not whole is removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by finish() or abort()

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise ReceiveError(f"writing {self.path}: {exc.strerror or exc}") from None

    def finish(self, timeout: float = 600) -> None:
        try:
            self._file.close()
        except OSError as exc:
            self.abort()
            raise ReceiveError(f"writing {self.path}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def chunk_mismatch(plan: Plan, index: int, data: bytes) -> str:
    """ "" if ``data`` is chunk ``index`` of the plan's stream, else what it is instead."""
    expected = plan.image.chunks[index]
    digest = hashlib.sha256(data).hexdigest()
    if len(data) == expected.size and digest == expected.sha256:
        return ""
    return (
        f"{len(data)} bytes with sha256 {digest}, "
        f"the plan says {expected.size} bytes with sha256 {expected.sha256}"
    )


class VerifiedStream:
    """The image's stream on its way to the unpacker: the plan's chunks in order, each
    one checked (:meth:`matches`) before a byte of it is written, the whole stream checked
    once more at the end (:meth:`check`).

    Every receiver of the stream uses one; a receiver only decides where the bytes come
    from. ``write`` is where checked chunks go (:meth:`Unpacker.write`, or a queue in
    front of it); ``progress`` hears of every chunk added.
    """

    def __init__(
        self, plan: Plan, write: Callable[[bytes], None], progress: ProgressCallback
    ) -> None:
        self.plan = plan
        self.write = write
        self.progress = progress
        self.whole = hashlib.sha256()
        self.index = 0  # the first chunk not yet written
        self.done = 0  # bytes written
        #: seconds spent in ``write`` (blocked while the unpacker is slow)
        self.busy = 0.0

    @property
    def total(self) -> int:
        return self.plan.image.stream_size

    @property
    def complete(self) -> bool:
        return self.index >= len(self.plan.image.chunks)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` is the next chunk, as the plan says."""
        return not chunk_mismatch(self.plan, self.index, data)

    def add(self, data: bytes) -> None:
        """Write the next chunk, which the caller checked, and count it."""
        started = time.monotonic()
        self.write(data)
        self.busy += time.monotonic() - started
        self.whole.update(data)
        self.done += len(data)
        self.index += 1
        self.progress(self.done, self.total)

    def partial(self) -> Callable[[int], None]:
        """Progress of the next chunk while it arrives: ``partial(n)`` for n bytes of it."""
        base = self.done

        def report(n: int) -> None:
            self.progress(base + n, self.total)

        return report

    def check(self) -> None:
        """Raise :class:`ReceiveError` unless the stream is the plan's, byte for byte."""
        image = self.plan.image
        digest = self.whole.hexdigest()
        if self.done != image.stream_size or digest != image.stream_sha256:
            raise ReceiveError(
                f"image {image.ref}: the stream is {self.done} bytes with sha256 {digest}, "
                f"the plan says {image.stream_size} bytes with sha256 {image.stream_sha256}"
            )


class UnpackQueue:
    """Writes checked chunks into the unpacker from a thread of its own, in order: the
    receiving thread goes on reading its source meanwhile (a 4 MiB write into the pipe
    takes long enough to stall a link, and with the chain every node after this one)."""

    def __init__(self, unpacker: Sink, cancel: threading.Event, depth: int) -> None:
        self.unpacker = unpacker
        self.cancel = cancel
        self.queue: queue.Queue[bytes | None] = queue.Queue(max(1, depth))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="corral-unpack", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            data = self.queue.get()
            if data is None:
                return
            if self.error is None:  # after an error, only empty the queue
                try:
                    self.unpacker.write(data)
                except BaseException as exc:
                    self.error = exc

    def put(self, data: bytes) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(data, timeout=0.2)
                return
            except queue.Full:
                if self.cancel.is_set():
                    raise Cancelled() from None

    def close(self) -> None:
        """Wait until everything is written; raise what writing raised."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop (the caller aborts the unpacker first, which ends a write in progress)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
