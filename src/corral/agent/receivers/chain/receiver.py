"""The ``chain`` receiver itself (:class:`ChainReceiver`): it pulls the stream from its
upstream, forwards it through its relay and unpacks it; see :mod:`corral.agent.receivers.chain`."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers.base import Context, Job, Received, StreamReceiver
from corral.agent.receivers.chain.relay import DRAIN_IDLE, Relay
from corral.agent.receivers.chain.upstream import (
    PACE_SPAN,
    RECONNECT_GRACE,
    START_PATIENCE,
    ChainParams,
    LagWatch,
    Picker,
    Upstream,
)
from corral.agent.receivers.chain.window import HOLD_SECONDS, WINDOW_CHUNKS, Window
from corral.agent.receivers.stream import VerifiedStream
from corral.agent.wire.chain import (
    BUSY,
    DATA,
    FRAME,
    HEARTBEAT,
    HELLO_TIMEOUT,
    IDLE,
    OK,
    PASSED,
    PIECE,
    SILENCE,
    SKIP,
    STATUS_TEXT,
    ProtocolError,
    pack_hello,
    read_answer,
    read_exact,
    tune,
)

log = logging.getLogger("corral.agent")

#: For a connection to an upstream. Long: the node is busy receiving, its download link is
#: full and drops SYNs, retried after 1, 3 and 7 s (at 3 s, nodes alive were passed for
#: dead and a node behind a slow one walked all the way to the head). A dead process
#: refuses at once, and a powered-off machine fails its ARP in 3 s.
CONNECT_TIMEOUT = 10.0
#: Pause between two connection attempts to the same upstream.
RETRY_DELAY = 0.5
#: How long :meth:`ChainReceiver.receive` itself waits for that before it returns (the
#: node right behind is milliseconds behind); past it, the relay goes on serving from a
#: thread of its own, so that a slow successor never holds up this node's install.
LINGER = 5.0
#: An upstream that fell this many seconds (of its own upstream's pace) behind its own
#: upstream within the last LAG_WINDOW is a slow node: pull past it (see
#: :class:`LagWatch`: a node that started late, or just changed upstream, is behind but
#: not slow). A time, not a byte count: the same on every link rate. 8 s: a host that
#: stalls a node for a few seconds passes nobody, and behind a node at a tenth of the
#: chain's rate, its successor leaves it after about 9 s (its predecessor hands the slot
#: over: the slow node is fed by nobody's uplink but the tail's, or by HTTP).
LAG_SECONDS = 8.0
#: Checked chunks waiting for ``zstd -d | tar -x`` (unpacked from a thread of their own, so
#: that the socket is read meanwhile: a 4 MiB write into the pipe takes long enough to
#: stall the link, and every node after this one with it). With the window, a node holds
#: up to (8 + 4 + 1) x 4 MiB = 52 MiB of the stream in RAM.
UNPACK_QUEUE = 4


class Silent(ConnectionError):
    """The other side sent nothing, not even a heartbeat, for too long."""


class _Switch(Exception):
    """Stop reading this upstream (at a chunk boundary) and pick again."""

    def __init__(
        self,
        why: str,
        *,
        failure: bool,
        fatal: bool = False,
        lagging: bool = False,
        exiled: bool = False,
    ) -> None:
        super().__init__(why)
        self.failure = failure
        self.fatal = fatal
        self.lagging = lagging
        #: refused as a second successor, or passed by its own successor
        self.exiled = exiled


@dataclass
class _State:
    """What one receive has done so far."""

    stream: VerifiedStream
    #: the bytes of chunk ``next`` so far: kept across upstreams (the bytes are the same)
    partial: bytearray = field(default_factory=bytearray)
    from_relay: int = 0
    from_http: int = 0
    bad: int = 0
    skips: int = 0
    lag_passes: int = 0
    #: the most this node fell behind an upstream (ms, as :class:`LagWatch` measures it):
    #: against :data:`LAG_SECONDS`, how near its successor came to passing it
    most_lag: int = 0

    @property
    def next(self) -> int:
        """The first chunk not yet unpacked."""
        return self.stream.index

    @property
    def done(self) -> int:
        return self.stream.done


class ChainReceiver(StreamReceiver):
    """Pulls the stream from the node before it, forwards it to the node after it."""

    name = "chain"

    # knobs, as attributes so that the tests can make them short
    window_chunks = WINDOW_CHUNKS
    heartbeat = HEARTBEAT
    silence = SILENCE
    start_patience = START_PATIENCE
    grace = RECONNECT_GRACE
    drain_idle = DRAIN_IDLE
    linger = LINGER
    lag_seconds = LAG_SECONDS
    lag_span = PACE_SPAN
    unpack_queue = UNPACK_QUEUE
    hold_seconds = HOLD_SECONDS

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.picker: Picker | None = None
        self.relay: Relay | None = None

    def receive(self, job: Job) -> Received:
        params = ChainParams.from_dict(job.plan.transport.params)
        image = job.plan.image
        sizes = [c.size for c in image.chunks]
        window = Window(sizes, self.window_chunks, hold=self.hold_seconds)
        name, ip = params.me
        self.relay = relay = Relay(
            (ip or "", params.relay_port),
            params.session,
            window,
            heartbeat=self.heartbeat,
            after=[m for m, _ in params.members[params.position + 1 :]],
            expected=not params.is_last,
        )
        relay.start()
        self.picker = Picker(
            params.upstreams(),
            start_patience=self.start_patience,
            grace=self.grace,
            tail=params.tail(),
        )
        log.info(
            "chain: %s is %d of %d in session %s",
            name,
            params.position + 1,
            len(params.members),
            params.session,
        )
        states: list[_State] = []

        def fill(stream: VerifiedStream) -> None:
            states.append(_State(stream))
            self._pull(job.plan, params, window, states[0], job.cancel)

        try:
            self.unpack(job, fill)
            state = states[0]
            relay.finished()
            drained = relay.drain(job.cancel, params.is_last, self.drain_idle, self.linger)
            if job.cancel.is_set():
                raise Cancelled()
        except BaseException:
            relay.close()
            raise
        if drained:
            relay.close()
        else:
            log.info("chain: still serving after the image is in; going on meanwhile")
            relay.close_when_drained(params.is_last, self.drain_idle)
        details = {
            "chunks": len(sizes),
            "from_relay": state.from_relay,
            "from_http": state.from_http,
            "bad": state.bad,
            "skips": state.skips,
            "switches": self.picker.switches,
            "lag_passes": state.lag_passes,
            "most_lag_ms": state.most_lag,
            "held_ms": int(window.held * 1000),
            "exiled": int(self.picker.exiled or self.picker.http_rest),
            "served_bytes": relay.served,
        }
        log.info("chain: received %s: %s", image.ref, details)
        return Received(state.done, details)

    # -- pulling ------------------------------------------------------------------

    def _accept(self, data: bytes, window: Window, state: _State) -> None:
        """The next chunk, checked: forward it, unpack it, count it."""
        window.complete(state.next, data)
        state.partial = bytearray()
        log.debug("chain: chunk %d whole", state.next)
        state.stream.add(data)

    def _fetch_http(
        self, plan: Plan, window: Window, state: _State, cancel: threading.Event
    ) -> None:
        index = state.next
        client = self.context.client
        if client is None:
            raise ReceiveError(f"chunk {index:08d}: no server to fetch it from over HTTP")
        window.restart()
        state.partial = bytearray()
        data = self.fetch_chunk(client, plan, index, state.stream.partial(), cancel)
        state.from_http += 1
        self._accept(data, window, state)

    def _pull(
        self,
        plan: Plan,
        params: ChainParams,
        window: Window,
        state: _State,
        cancel: threading.Event,
    ) -> None:
        picker = self.picker
        assert picker is not None
        count = len(plan.image.chunks)
        me = params.me[0]
        while state.next < count:
            if cancel.is_set():
                raise Cancelled()
            upstream = picker.current()
            if upstream is None:
                log.info("chain: chunk %d over HTTP (no upstream answers)", state.next)
                self._fetch_http(plan, window, state, cancel)
                picker.after_http()
                continue
            try:
                sock = self._connect(
                    upstream, params.session, (state.next, len(state.partial)), me, picker
                )
            except _Switch as exc:
                log.info("chain: %s: %s", upstream.name, exc)
                if exc.exiled:
                    picker.exile(feeding=self.relay is not None and self.relay.feeding())
                    after = picker.current()
                    log.warning(
                        "chain: %s refused us (%s): %s",
                        upstream.name,
                        exc,
                        f"pulling from the tail, {after.name}" if after else "the rest over HTTP",
                    )
                elif picker.failed(fatal=exc.fatal):
                    log.warning("chain: passing %s (%s)", upstream.name, exc)
                elif cancel.wait(RETRY_DELAY):
                    raise Cancelled() from None
                continue
            log.info(
                "chain: pulling from %s at chunk %d (+%d)",
                upstream.name,
                state.next,
                len(state.partial),
            )
            try:
                self._stream(sock, plan, window, state, cancel, upstream.head)
            except _Switch as exc:
                if not exc.failure:
                    log.info("chain: leaving %s: %s", upstream.name, exc)
                    if exc.lagging:
                        state.lag_passes += 1
                        picker.pass_lagging()
                elif picker.failed(fatal=exc.fatal):
                    log.warning("chain: passing %s (%s)", upstream.name, exc)
                else:
                    log.info("chain: %s: %s", upstream.name, exc)
            finally:
                with contextlib.suppress(OSError):
                    sock.close()

    def _connect(
        self, upstream: Upstream, tag: str, at: tuple[int, int], me: str, picker: Picker
    ) -> socket.socket:
        """A connection to ``upstream`` that said yes to resuming ``at`` (chunk, offset)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tune(sock)
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(upstream.address)
        except OSError as exc:
            sock.close()
            raise _Switch(f"cannot connect: {exc}", failure=True) from None
        picker.answered()
        try:
            sock.settimeout(HELLO_TIMEOUT)
            sock.sendall(pack_hello(tag, at[0], me, at[1], passing=picker.passing))
            status, _have, message = read_answer(lambda n: read_exact(sock, n))
        except (OSError, ProtocolError, struct.error) as exc:
            sock.close()
            raise _Switch(f"no answer to the hello: {exc}", failure=True) from None
        if status != OK:
            sock.close()
            text = STATUS_TEXT.get(status, str(status))
            raise _Switch(
                f"refused: {text} {message}".rstrip(),
                failure=True,
                fatal=True,
                exiled=status in (BUSY, PASSED),
            )
        return sock

    def too_slow(self, lag_ms: int) -> bool:
        """Whether an upstream that says it fell ``lag_ms`` behind its own lately is a
        slow node."""
        return lag_ms >= self.lag_seconds * 1000

    def _read(self, sock: socket.socket, n: int, cancel: threading.Event) -> bytes:
        """``n`` bytes, looking at the cancel flag and the upstream's silence meanwhile."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        quiet_since = time.monotonic()
        sock.settimeout(0.2)
        while got < n:
            try:
                k = sock.recv_into(view[got:])
            except TimeoutError:
                if cancel.is_set():
                    raise Cancelled() from None
                if time.monotonic() - quiet_since > self.silence:
                    raise Silent(f"nothing for {self.silence:.0f} s") from None
                continue
            if not k:
                raise ConnectionError("the connection closed")
            got += k
            quiet_since = time.monotonic()
        return bytes(buf)

    def _stream(
        self,
        sock: socket.socket,
        plan: Plan,
        window: Window,
        state: _State,
        cancel: threading.Event,
        from_head: bool = False,
    ) -> None:
        """Read frames until the stream is whole; :class:`_Switch` to leave this upstream.

        Each frame says how far the upstream fell behind its own upstream (its ``lag``):
        past :meth:`too_slow`, this node pulls past it. This node's own lag, for the nodes
        after it, is measured here the same way; not behind the head, which holds
        everything from the start (a node pulling from it is as fast as its own link)."""
        picker = self.picker
        assert picker is not None
        chunks = plan.image.chunks
        count = len(chunks)
        buf = state.partial
        tries = max(1, self.context.tries)
        watch = LagWatch(span=self.lag_span)
        window.lag = 0
        lagging = False
        while state.next < count:
            if cancel.is_set():
                raise Cancelled()
            try:
                header = self._read(sock, FRAME.size, cancel)
                kind, index, offset, length, have, lag, sent = FRAME.unpack(header)
                if kind == IDLE:
                    continue
                if not from_head:
                    window.lag = watch.growth(have, (state.done + len(buf)) >> 10, sent)
                    state.most_lag = max(state.most_lag, window.lag)
                if kind == SKIP:
                    state.skips += 1
                    end = min(index, count)
                    log.info("chain: chunks %d to %d over HTTP", state.next, end - 1)
                    while state.next < end:
                        self._fetch_http(plan, window, state, cancel)
                    buf = state.partial
                    continue
                size = chunks[state.next].size
                if kind != DATA or index != state.next or offset != len(buf):
                    raise ProtocolError(
                        f"frame {kind} for chunk {index} at {offset}, "
                        f"expected chunk {state.next} at {len(buf)}"
                    )
                if not 0 < length <= size - offset:
                    raise ProtocolError(f"{length} bytes at {offset} of a {size}-byte chunk")
                lagging = self.too_slow(lag)
                while length:
                    piece = self._read(sock, min(length, PIECE), cancel)
                    length -= len(piece)
                    buf += piece
                    window.extend(piece)
                    state.stream.progress(state.done + len(buf), state.stream.total)
                picker.succeeded()
            except (OSError, ProtocolError, struct.error) as exc:
                fatal = isinstance(exc, ProtocolError)
                raise _Switch(f"{type(exc).__name__}: {exc}", failure=True, fatal=fatal) from None
            if len(buf) < size:
                if lagging and picker.farther() is not None:
                    raise _Switch(  # mid-chunk: the part we have is kept, resumed at its byte
                        f"it fell {lag / 1000:.1f} s behind its upstream",
                        failure=False,
                        lagging=True,
                    )
                continue
            data = bytes(buf)
            buf = state.partial = bytearray()
            if not state.stream.matches(data):
                state.bad += 1
                window.restart()
                log.warning("chain: chunk %d from upstream does not match its sha256", state.next)
                if state.bad % tries:
                    raise _Switch("a chunk did not match: asking again", failure=False)
                # the same upstream sent it wrong `tries` times: HTTP for it, and pass it
                self._fetch_http(plan, window, state, cancel)
                raise _Switch("its chunks do not match", failure=True, fatal=True)
            state.from_relay += 1
            self._accept(data, window, state)
            buf = state.partial
            # a slow upstream
            if lagging and picker.farther() is not None:
                raise _Switch(
                    f"it fell {lag / 1000:.1f} s behind its upstream",
                    failure=False,
                    lagging=True,
                )
