"""The node's relay (:class:`Relay`): it serves whoever comes after it in the chain from
its :class:`~corral.agent.receivers.chain.window.Window`, and says when it may close."""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Collection

from corral.agent.receivers.chain.window import Window
from corral.agent.wire.chain import HEARTBEAT, tune
from corral.agent.wire.chain_sender import Sender, Slot, answer_hello

log = logging.getLogger("corral.agent")

#: A node with the whole image closes its relay after this long without a successor
#: connecting or being served, counted from the moment it had it all (longer than
#: START_PATIENCE: a successor may still be waiting for a dead node between us).
DRAIN_IDLE = 20.0


class Relay:
    """This node's listener: serves whoever comes after it in the chain from the window."""

    def __init__(
        self,
        address: tuple[str, int],
        tag: str,
        window: Window,
        *,
        heartbeat: float = HEARTBEAT,
        after: Collection[str] = (),
        expected: bool = False,
    ) -> None:
        self.tag = tag
        self.window = window
        self.heartbeat = heartbeat
        self.senders: list[Sender] = []
        #: the one node after this one that it feeds
        self.slot = Slot()
        #: the nodes after this one in the chain (the window holds the stream for the one
        #: fed here if it is one of them), and whether one is to come
        self.after = frozenset(after)
        self.expected = expected
        window.successor = self._successor
        self.closing = False
        self.last_event = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sock: socket.socket | None = self._listen(address)
        self._thread = threading.Thread(target=self._accept, name="corral-relay", daemon=True)

    @staticmethod
    def _listen(address: tuple[str, int]) -> socket.socket | None:
        """A listening socket on this node's address (any address if that one is not
        ours: a DHCP lease may differ from the inventory); None if the port is taken,
        and then the nodes after this one pull past it."""
        for host in dict.fromkeys((address[0], "")):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tune(sock)
            try:
                sock.bind((host, address[1]))
                sock.listen(16)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRNOTAVAIL:
                    log.warning("chain: cannot listen on port %d: %s", address[1], exc)
                    return None
        return None

    def start(self) -> None:
        if self.sock is not None:
            self._thread.start()

    def _accept(self) -> None:
        sock = self.sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 0.2)
                if not ready:
                    continue
                conn, peer = sock.accept()
            except (OSError, ValueError):
                return
            threading.Thread(
                target=self._serve, args=(conn, peer[0]), name="corral-relay-out", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            tune(conn)
            hello = answer_hello(conn, self._have_for, self.closing, self.slot.claim)
        except OSError:
            hello = None
        if hello is None:
            conn.close()
            return
        sender = Sender(
            conn, self.window, self.window.sizes, hello.index, f"{hello.name} ({peer})",
            offset=hello.offset, heartbeat=self.heartbeat,
        )  # fmt: skip
        with self._lock:
            if self.closing:
                conn.close()
                return
            self.senders.append(sender)
            self.last_event = time.monotonic()
        self.slot.attach(hello.name, sender)
        log.info("chain: serving %s from chunk %d (+%d)", sender.peer, hello.index, hello.offset)
        sender.run()
        log.info(
            "chain: %s %s after %d bytes%s",
            sender.peer,
            "has everything" if sender.complete else "left",
            sender.sent,
            f" ({sender.error})" if sender.error else "",
        )

    def _successor(self) -> tuple[str, int] | None:
        """Whom the window holds the stream for (see :meth:`Slot.needs`): nobody if this
        relay could not listen (the nodes after it pull past it)."""
        return None if self.sock is None else self.slot.needs(self.after, self.expected)

    def _have_for(self, tag: str) -> int | None:
        return self.window.have if tag == self.tag else None

    def feeding(self) -> bool:
        """Whether a node after this one is pulling from it now."""
        return self.slot.holder() is not None

    @property
    def served(self) -> int:
        with self._lock:
            return sum(s.sent for s in self.senders)

    def drained(self, is_last: bool, idle: float) -> bool:
        """Whether this node, holding the whole image, may stop serving: nobody is being
        served (a downstream that took nothing for ``idle`` seconds no longer counts) and
        someone got everything from it, or it is last in the chain, or nothing happened
        for ``idle`` seconds."""
        if self.sock is None:
            return True
        now = time.monotonic()
        with self._lock:
            if any(not s.done.is_set() and now - s.last_progress < idle for s in self.senders):
                return False
            latest = max([self.last_event, *(s.last_progress for s in self.senders)])
            complete = any(s.complete for s in self.senders)
        return is_last or complete or now - latest >= idle

    def finished(self) -> None:
        """This node holds the whole image: the idle time of :meth:`drained` counts from now."""
        with self._lock:
            self.last_event = time.monotonic()

    def drain(
        self, cancel: threading.Event, is_last: bool, idle: float = DRAIN_IDLE, limit: float = 0
    ) -> bool:
        """Wait until :meth:`drained` (at most ``limit`` seconds if given); whether it is."""
        deadline = time.monotonic() + limit if limit else None
        while not self.drained(is_last, idle):
            if cancel.wait(0.2) or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def close_when_drained(self, is_last: bool, idle: float = DRAIN_IDLE) -> None:
        """Serve on from a thread of this relay's own, and close once drained.

        The thread is not a daemon: an agent that exits after its install (its final
        report sent) waits for it, and one that reboots or powers off the node waits for
        it up to a minute (``corral.agent.main.serving_others``), so a successor still
        pulling is not cut off; past that it pulls from further up the chain."""

        def wait_then_close() -> None:
            self.drain(threading.Event(), is_last, idle)
            log.info("chain: relay closed after serving %d bytes", self.served)
            self.close()

        threading.Thread(target=wait_then_close, name="corral-relay-end", daemon=False).start()

    def close(self) -> None:
        with self._lock:
            self.closing = True
            senders = list(self.senders)
        self._stop.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.window.close()
        for sender in senders:
            with contextlib.suppress(OSError):
                sender.sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(2)
