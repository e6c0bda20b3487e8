"""Receivers: how an image's bytes reach the node's mounted root filesystem.

Every transport (``plan.transport.name``) has one receiver class in :data:`RECEIVERS`; a
new transport (multicast, BitTorrent, a chain of nodes) adds a class with the same small
interface and registers it with :func:`register`. The installer knows nothing else of them.

``http``
    the image's zstd tar stream, chunk by chunk, each checked against the plan before one
    of its bytes reaches ``zstd -d | tar -x``: nothing unverified is ever unpacked, and no
    copy of the whole stream is kept (a node's RAM disk could not hold it).
``rsync``
    the image's tree, straight into the target: a node that already holds an older version
    receives only the differences, which is why the installer keeps its filesystems then.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import logging
import os
import queue
import re
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

from corral.agent.plan import Plan
from corral.agent.report import Client, Rejected, ReportError

log = logging.getLogger("corral.agent")

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

#: Paths in the target that ``rsync --delete`` must leave alone: the filesystem's own
#: lost+found and the installer's layout stamp (see :mod:`corral.agent.disk`) with its
#: directory.
RSYNC_PROTECT = ("/lost+found", "/etc/corral/", "/etc/corral/layout.json")


class ReceiveError(Exception):
    """The image could not be received; the message is the one-line reason."""


class Cancelled(ReceiveError):
    """The deployment was cancelled while the image was arriving."""

    def __init__(self) -> None:
        super().__init__("cancelled")


@dataclass
class Context:
    """What receivers may use: the server connection and the agent's patience."""

    client: Client | None
    #: fetches of one chunk whose bytes do not match before giving up; also how many
    #: connection drops in a row (without a byte of progress) a chunk survives
    tries: int = 5
    #: seconds between two looks at the cancel flag while a tool runs
    poll: float = 0.2


@dataclass
class Received:
    """What a receiver did, for the log and the tests."""

    bytes: int
    details: dict[str, int] = field(default_factory=dict)


class Receiver:
    """The interface of a transport; subclasses set ``name`` and :meth:`receive`."""

    name: ClassVar[str] = ""
    #: True if it updates what the target already holds (so the filesystems are worth
    #: keeping); False if it writes everything anew
    incremental: ClassVar[bool] = False

    def __init__(self, context: Context) -> None:
        self.context = context

    def receive(
        self,
        plan: Plan,
        target_dir: Path,
        progress_callback: ProgressCallback,
        cancel_event: threading.Event,
    ) -> Received:
        """Fill ``target_dir`` with the image; raise :class:`ReceiveError` (or
        :class:`Cancelled` once ``cancel_event`` is set) if it cannot."""
        raise NotImplementedError

    def expected_bytes(self, plan: Plan) -> int:
        """The byte count :meth:`receive` reports progress against (0: unknown)."""
        return 0


RECEIVERS: dict[str, type[Receiver]] = {}


def register(cls: type[Receiver]) -> type[Receiver]:
    """Class decorator: make ``cls`` the receiver of transport ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no transport name")
    RECEIVERS[cls.name] = cls
    return cls


def receiver_class(transport: str) -> type[Receiver]:
    try:
        return RECEIVERS[transport]
    except KeyError:
        known = ", ".join(sorted(RECEIVERS))
        raise ReceiveError(f"unknown transport {transport!r}: this agent has {known}") from None


def make_receiver(transport: str, context: Context) -> Receiver:
    return receiver_class(transport)(context)


def _tail(stream: IO[bytes] | None, lines: int = 3) -> str:
    """The last lines a tool wrote to ``stream`` (a temporary file), on one line."""
    if stream is None:
        return ""
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:])


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate ``proc`` if it still runs, then kill it; reap it either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- http ------------------------------------------------------------------------------


class Unpacker:
    """``zstd -d | tar -x`` into a directory, fed through :meth:`write`.

    The pipe between the two is the kernel's, so the agent never holds more than the chunk
    it is writing.
    """

    def __init__(self, target_dir: Path) -> None:
        # closed by finish() or abort(): they outlive this call
        self._errors = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]  # noqa: SIM115
        self.zstd: subprocess.Popen[bytes] = subprocess.Popen(
            ["zstd", "-d", "-q", "-c"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors[0],
        )
        try:
            self.tar: subprocess.Popen[bytes] = subprocess.Popen(
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
                parts.append(f"{name} exited with {proc.returncode}: {_tail(errors)}".rstrip(": "))
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
                _stop(proc)
        self._close_errors()

    def _close_errors(self) -> None:
        for f in self._errors:
            if not f.closed:
                f.close()


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

    def __init__(self, unpacker: Unpacker, cancel: threading.Event, depth: int) -> None:
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


class StreamReceiver(Receiver):
    """The base of the receivers of the image's chunked zstd tar stream (http, multicast,
    chain, bittorrent): what they share, so that a transport only says where the bytes
    come from.

    :meth:`unpack` owns the skeleton: ``zstd -d | tar -x`` into the target (written at
    once, or through an :class:`UnpackQueue` of :attr:`unpack_queue` chunks), the
    :class:`VerifiedStream` that checks every chunk and the whole stream, the HTTP catch-up
    from the first chunk the transport did not deliver (:meth:`catch_up`,
    :meth:`fetch_chunk`), and the end: the unpacking finished and checked, or aborted on
    any error.
    """

    #: bytes asked of the socket at a time: small enough to see a cancel quickly
    read_size = 1 << 16
    #: checked chunks that may wait for the unpacker, written from a thread of its own
    #: (0: the receiving thread writes them itself)
    unpack_queue: ClassVar[int] = 0

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.refetched: list[int] = []  # chunks whose bytes did not match, once per fetch
        self.resumed: list[tuple[int, int]] = []  # (chunk, offset) of Range requests

    def expected_bytes(self, plan: Plan) -> int:
        return plan.image.stream_size

    def make_unpacker(self, target_dir: Path) -> Unpacker:
        """What the checked chunks are written to (the tests replace it)."""
        return Unpacker(target_dir)

    def unpack(
        self,
        plan: Plan,
        target_dir: Path,
        progress_callback: ProgressCallback,
        cancel_event: threading.Event,
        fill: Callable[[VerifiedStream], None],
    ) -> VerifiedStream:
        """Unpack the plan's stream into ``target_dir``: ``fill`` adds what chunks the
        transport brings, HTTP the rest; the stream, whole and checked.

        Raise :class:`ReceiveError` (or :class:`Cancelled`) if it cannot; the unpacking is
        aborted then, whatever raised."""
        unpacker = self.make_unpacker(target_dir)
        queued = None
        if self.unpack_queue:
            queued = UnpackQueue(unpacker, cancel_event, self.unpack_queue)
        stream = VerifiedStream(
            plan, unpacker.write if queued is None else queued.put, progress_callback
        )
        try:
            fill(stream)
            if not stream.complete:
                self.catch_up(stream, cancel_event)
            if queued is not None:
                queued.close()
            unpacker.finish()
        except BaseException:
            unpacker.abort()
            if queued is not None:
                queued.abort()
            raise
        stream.check()
        return stream

    def chunk_url(self, plan: Plan, index: int) -> str:
        base = str(plan.transport.params.get("base", "")).rstrip("/")
        if not base:
            raise ReceiveError("transport http: the plan has no 'base' URL")
        return f"{base}/chunks/{index:08d}.bin"

    def catch_up(self, stream: VerifiedStream, cancel_event: threading.Event) -> None:
        """The chunks ``stream`` still lacks, in order, each fetched with :meth:`fetch_chunk`."""
        client = self.context.client
        if client is None:
            raise ReceiveError(f"chunk {stream.index:08d}: no server to fetch it from over HTTP")
        while not stream.complete:
            if cancel_event.is_set():
                raise Cancelled()
            partial = stream.partial()
            stream.add(self.fetch_chunk(client, stream.plan, stream.index, partial, cancel_event))

    def fetch_chunk(
        self,
        client: Client,
        plan: Plan,
        index: int,
        partial: Callable[[int], None],
        cancel_event: threading.Event,
    ) -> bytes:
        """Chunk ``index``, checked: its bytes are kept in memory across dropped
        connections (resumed with a Range request) and fetched again if they do not match."""
        expected = plan.image.chunks[index]
        url = self.chunk_url(plan, index)
        name = f"chunk {index:08d}"
        tries = max(1, self.context.tries)
        for attempt in range(1, tries + 1):
            data = self._download(client, url, index, expected.size, partial, cancel_event)
            wrong = chunk_mismatch(plan, index, data)
            if not wrong:
                return data
            self.refetched.append(index)
            log.warning("%s: %s (try %d of %d)", name, wrong, attempt, tries)
        raise ReceiveError(
            f"{name} of {plan.image.ref} did not match its sha256 after {tries} downloads"
        )

    def _download(
        self,
        client: Client,
        url: str,
        index: int,
        size: int,
        partial: Callable[[int], None],
        cancel_event: threading.Event,
    ) -> bytes:
        """The body of ``url`` (``size`` bytes expected), resumed after dropped connections."""
        name = f"chunk {index:08d}"
        buf = bytearray()
        drops = 0
        while True:
            if cancel_event.is_set():
                raise Cancelled()
            if buf:
                self.resumed.append((index, len(buf)))
                log.info("%s: resuming from byte %d", name, len(buf))
            try:
                answer = client.download(url, start=len(buf))
            except Rejected as exc:
                raise ReceiveError(f"{name}: the server refused it: {exc}") from None
            except ReportError as exc:
                raise ReceiveError(f"{name}: {exc}") from None
            before = len(buf)
            error = ""
            with answer:
                del buf[answer.offset :]  # a whole answer to a Range request starts over
                try:
                    while len(buf) <= size:  # one byte more shows an overlong answer
                        if cancel_event.is_set():
                            raise Cancelled()
                        piece = answer.read(self.read_size)
                        if not piece:
                            break
                        buf += piece
                        partial(len(buf))
                except (OSError, http.client.HTTPException) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                whole = not error and answer.complete
            if len(buf) >= size or whole:
                return bytes(buf)  # the caller checks length and hash
            drops = 0 if len(buf) > before else drops + 1
            log.warning(
                "%s: connection dropped at byte %d of %d%s",
                name,
                len(buf),
                size,
                f" ({error})" if error else "",
            )
            if drops >= max(1, self.context.tries):
                raise ReceiveError(
                    f"{name}: the connection dropped {drops} times at byte {len(buf)} of {size}"
                )


@register
class HttpReceiver(StreamReceiver):
    """Chunks of the zstd tar stream over HTTP, checked one by one, unpacked on arrival."""

    name = "http"

    def receive(
        self,
        plan: Plan,
        target_dir: Path,
        progress_callback: ProgressCallback,
        cancel_event: threading.Event,
    ) -> Received:
        if self.context.client is None:
            raise ReceiveError("transport http needs corral.server= to download from")
        image = plan.image
        stream = self.unpack(
            plan, target_dir, progress_callback, cancel_event, lambda _stream: None
        )
        log.info(
            "received %s: %d bytes in %d chunks (%d fetched again, %d resumed)",
            image.ref,
            stream.done,
            len(image.chunks),
            len(self.refetched),
            len(self.resumed),
        )
        return Received(
            stream.done,
            {
                "chunks": len(image.chunks),
                "refetched": len(self.refetched),
                "resumed": len(self.resumed),
            },
        )


# --- rsync -----------------------------------------------------------------------------

#: ``--info=progress2`` lines: "  1,234,567  42%  10.00MB/s  0:00:01 (xfr#3, to-chk=5/9)"
_PROGRESS2 = re.compile(rb"^\s*([\d,.]+)\s+\d+%")
_STAT = re.compile(
    r"^(Number of regular files transferred|Total file size|Literal data|"
    r"Matched data|Total bytes received|Number of deleted files): ([\d,.]+)"
)


def parse_progress2(line: bytes) -> int | None:
    """The byte count of one ``--info=progress2`` line, or None for other lines."""
    match = _PROGRESS2.match(line)
    if not match:
        return None
    digits = match.group(1).replace(b",", b"").replace(b".", b"")
    return int(digits) if digits.isdigit() else None


def parse_stats(text: str) -> dict[str, int]:
    """The counts of ``rsync --stats`` that tell what was sent: ``files``, ``literal``
    (bytes sent as data), ``matched``, ``received``, ``deleted``, ``size``."""
    keys = {
        "Number of regular files transferred": "files",
        "Total file size": "size",
        "Literal data": "literal",
        "Matched data": "matched",
        "Total bytes received": "received",
        "Number of deleted files": "deleted",
    }
    stats: dict[str, int] = {}
    for line in text.splitlines():
        match = _STAT.match(line.strip())
        if match:
            digits = match.group(2).replace(",", "").replace(".", "")
            if digits.isdigit():
                stats[keys[match.group(1)]] = int(digits)
    return stats


@register
class RsyncReceiver(Receiver):
    """``rsync -aHAX --numeric-ids --delete`` of the image's tree into the target."""

    name = "rsync"
    incremental = True

    #: seconds rsync may go without a byte of output before it is given up
    stall_timeout = 600.0

    def expected_bytes(self, plan: Plan) -> int:
        return plan.image.tree_bytes

    def argv(self, plan: Plan, target_dir: Path) -> list[str]:
        url = str(plan.transport.params.get("url", ""))
        if not url:
            raise ReceiveError("transport rsync: the plan has no 'url'")
        if not url.endswith("/"):
            url += "/"  # the tree's content, not a directory of that name
        argv = ["rsync", "-aHAX", "--numeric-ids", "--delete", "--info=progress2", "--stats"]
        argv += [f"--filter=P {path}" for path in RSYNC_PROTECT]
        return [*argv, url, f"{target_dir}/"]

    def _run(
        self,
        argv: list[str],
        errors: IO[bytes],
        seen: Callable[[bytes], None],
        cancel_event: threading.Event,
        url: str,
    ) -> int:
        """Run rsync, handing each line of its output to ``seen`` (progress2 lines end
        in a carriage return); its exit code."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=dict(os.environ, LC_ALL="C"),
        )
        out = proc.stdout
        assert out is not None
        pending = b""
        last_output = time.monotonic()
        try:
            while True:
                if cancel_event.is_set():
                    raise Cancelled()
                ready, _, _ = select.select([out], [], [], self.context.poll)
                if not ready:
                    if time.monotonic() - last_output > self.stall_timeout:
                        raise ReceiveError(
                            f"rsync: no progress for {self.stall_timeout:.0f} s from {url}"
                        )
                    continue
                data = os.read(out.fileno(), 1 << 16)
                if not data:
                    break
                last_output = time.monotonic()
                *complete, pending = re.split(rb"[\r\n]", pending + data)
                for line in complete:
                    seen(line)
            seen(pending)
            return proc.wait()
        finally:
            _stop(proc)
            out.close()

    def receive(
        self,
        plan: Plan,
        target_dir: Path,
        progress_callback: ProgressCallback,
        cancel_event: threading.Event,
    ) -> Received:
        argv = self.argv(plan, target_dir)
        total = plan.image.tree_bytes
        log.info("+ %s", " ".join(argv))
        count = 0
        lines: list[bytes] = []

        def seen(line: bytes) -> None:
            nonlocal count
            value = parse_progress2(line)
            if value is not None:
                count = max(count, value)
                progress_callback(count, total)
            elif line.strip():
                lines.append(line)

        with tempfile.TemporaryFile() as errors:
            code = self._run(argv, errors, seen, cancel_event, str(plan.transport.params["url"]))
            complaints = _tail(errors, 1000)
        for line in complaints.split(" / ") if complaints else []:
            log.info("rsync: %s", line)
        if code != 0:
            raise ReceiveError(f"rsync exited with {code}: {complaints[-300:]}")
        text = b"\n".join(lines).decode("utf-8", "replace")
        for line in text.splitlines():
            log.debug("rsync: %s", line)
        stats = parse_stats(text)
        log.info(
            "rsync: %d files transferred, %d bytes of data sent, %d matched",
            stats.get("files", 0),
            stats.get("literal", 0),
            stats.get("matched", 0),
        )
        progress_callback(count, total)
        return Received(count, stats)


#: Modules of further receivers; each registers its class with :func:`register` on import.
BUILTIN: tuple[str, ...] = (
    "corral.agent.rx_bittorrent",
    "corral.agent.rx_chain",
    "corral.agent.rx_multicast",
)

for _module in BUILTIN:
    importlib.import_module(_module)
