"""A node's stripe over HTTP, in the server's turns (:class:`HttpStripe`).

The seed used to send every node its stripe at once, each at 1/N of the server's link, so
that every stripe's pieces were whole at about the same moment, S / B_server after the
first request, and until then nobody held a piece to trade. The server now sends the
stripes over HTTP, a few at a time in the order the nodes asked (its *turns*: see
:meth:`~corral.deploy.transports.bittorrent.BitTorrentTransport.turns`): the first pieces
are whole within a piece's time, and a node trades with its peers while it waits for its
turn (:class:`~corral.agent.receivers.bittorrent.seed.SeedUse`). libtorrent checks each
piece against the torrent's hash when it is added, as it does the peers' pieces.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Sequence

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.receivers.bittorrent.swarm import PieceMap, Swarm
from corral.agent.report import Client, Download, ReportError

log = logging.getLogger("corral.agent")

#: Seconds a request of the stripe may wait for its answer: the server holds it until one
#: of its turns is free, S / B_server at the most if every node asked at once (25 s on the
#: testbed's 10 Mbit/s server, 2 s for 5 GB at 25 GbE), and its bytes may then come slowly
#: on a downlink full of the peers' pieces.
WAIT = 300.0
#: Attempts at a piece whose connection broke.
TRIES = 3
#: Query of a stripe's requests: the server answers them in its turns.
QUERY = "stripe=1"


def fetch_piece(
    client: Client,
    chunk_url: Callable[[int], str],
    layout: PieceMap,
    piece: int,
    cancel: threading.Event,
    opened: Callable[[Download | None], None] = lambda _d: None,
) -> bytes:
    """The bytes of ``piece``, from the chunk files it lies in (Range requests); each
    answer open is passed to ``opened`` (None once it is closed), so that it can be closed
    from another thread."""
    parts = []
    for chunk, offset, length in layout.spans(piece):
        url = f"{chunk_url(chunk)}?{QUERY}"
        error = ""
        for _ in range(TRIES):
            if cancel.is_set():
                raise Cancelled()
            try:
                with client.download(
                    url, start=offset, end=offset + length - 1, timeout=WAIT
                ) as answer:
                    opened(answer)
                    data = _read(answer, length, cancel)
            except (OSError, http.client.HTTPException, ReportError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            finally:
                opened(None)
            if len(data) == length:
                parts.append(data)
                break
            error = f"{len(data)} of {length} bytes"
        else:
            raise ReceiveError(f"piece {piece} of my stripe over HTTP: {error}")
    return b"".join(parts)


def _read(answer: Download, length: int, cancel: threading.Event) -> bytes:
    if answer.offset == 0 and answer.status == 200 and answer.length not in (None, length):
        raise ReceiveError("the server ignored the range")
    buf = bytearray()
    while len(buf) < length:
        if cancel.is_set():
            raise Cancelled()
        data = answer.read(length - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


class HttpStripe:
    """Takes ``pieces`` (the node's stripe) over HTTP one after the other, in a thread of
    its own, each added to ``swarm`` as it comes; a piece the swarm has by then is skipped.
    :attr:`done` is set once it has stopped: with everything added, or :attr:`failed`
    saying why not."""

    def __init__(
        self,
        fetch: Callable[[int, threading.Event, Callable[[Download | None], None]], bytes],
        swarm: Swarm,
        pieces: Sequence[int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch = fetch
        self.swarm = swarm
        self.pieces = list(pieces)
        self.clock = clock
        self.added = 0
        self.failed = ""
        self.done = threading.Event()
        #: when it stopped (the clock's)
        self.ended = 0.0
        self._cancel = threading.Event()
        self._answer: Download | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stripe-over-http", daemon=True)

    def start(self) -> HttpStripe:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop taking the rest (its peers have it), closing an answer under way."""
        self._cancel.set()
        with self._lock:
            answer = self._answer
        if answer is not None:
            answer.close()

    def _opened(self, answer: Download | None) -> None:
        with self._lock:
            self._answer = answer
        if answer is not None and self._cancel.is_set():
            answer.close()

    def _run(self) -> None:
        try:
            for piece in self.pieces:
                if self._cancel.is_set():
                    return
                if self.swarm.pieces()[piece]:
                    continue
                data = self.fetch(piece, self._cancel, self._opened)
                self.swarm.add({piece: data})
                self.added += 1
        except Cancelled:
            pass
        except Exception as exc:  # said in the log; its peers rescue the rest
            self.failed = str(exc) or type(exc).__name__
            if not self._cancel.is_set():
                log.warning("bittorrent: my stripe over HTTP: %s", self.failed)
        finally:
            self.ended = self.clock()
            self.done.set()
