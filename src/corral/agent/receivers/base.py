"""The receivers' base: the small interface every transport's receiver has
(:class:`Receiver`), and the skeleton that the receivers of the chunked stream share
(:class:`StreamReceiver`)."""

from __future__ import annotations

import http.client
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers.stream import (
    FileWriter,
    ProgressCallback,
    Sink,
    Unpacker,
    UnpackQueue,
    VerifiedStream,
    chunk_mismatch,
)
from corral.agent.report import Client, Rejected, ReportError

log = logging.getLogger("corral.agent")


@dataclass
class Context:
    """What receivers may use: the server connection and the agent's patience."""

    client: Client | None
    #: fetches of one chunk whose bytes do not match before giving up; also how many
    #: connection drops in a row (without a byte of progress) a chunk survives
    tries: int = 5
    #: seconds between two looks at the cancel flag while a tool runs
    poll: float = 0.2
    #: the target's mount points below its root ("/boot/efi"), which the image may lack
    mount_points: tuple[str, ...] = ()
    #: told the tag of a transfer session the receiver has just joined (multicast), for
    #: corral, which starts the session once its nodes are in
    joined: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Job:
    """One image to receive: what (the plan), where its tree goes, whom to tell how far
    it got, and what stops it."""

    plan: Plan
    target: Path
    progress: ProgressCallback
    cancel: threading.Event
    #: write the checked stream as it is into this file instead of unpacking it into
    #: ``target`` (a diskless boot's squashfs)
    into_file: Path | None = None


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

    def receive(self, job: Job) -> Received:
        """Fill ``job.target`` with the image; raise :class:`ReceiveError` (or
        :class:`Cancelled` once ``job.cancel`` is set) if it cannot."""
        raise NotImplementedError

    def expected_bytes(self, plan: Plan) -> int:
        """The byte count :meth:`receive` reports progress against (0: unknown)."""
        return 0


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

    def unpack(self, job: Job, fill: Callable[[VerifiedStream], None]) -> VerifiedStream:
        """Unpack the plan's stream into ``job.target``: ``fill`` adds what chunks the
        transport brings, HTTP the rest; the stream, whole and checked.

        Raise :class:`ReceiveError` (or :class:`Cancelled`) if it cannot; the unpacking is
        aborted then, whatever raised."""
        unpacker: Sink = (
            FileWriter(job.into_file) if job.into_file else self.make_unpacker(job.target)
        )
        queued = None
        if self.unpack_queue:
            queued = UnpackQueue(unpacker, job.cancel, self.unpack_queue)
        stream = VerifiedStream(
            job.plan, unpacker.write if queued is None else queued.put, job.progress
        )
        try:
            fill(stream)
            if not stream.complete:
                self.catch_up(stream, job.cancel)
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
