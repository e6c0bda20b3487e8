"""The BitTorrent seed in a process of its own (:class:`SeedProcess`), a child of corral serve.

libtorrent's session does its disk and network work in threads of its own, but every call
into it from Python (adding a torrent, reading a counter, popping alerts) holds the GIL and
waits on the session's internal lock. With a hundred peers hammering the seed, such a call
can take long enough to be felt by the HTTP server that shares the process: plans, reports
and chunk requests answered late, which the nodes read as a slow server. And a crash in
libtorrent's native code would take corral serve down with it. So the seed runs in a
child process (``multiprocessing``'s *spawn*: a fresh interpreter, no copy of serve's
threads or sockets), and serve talks to it over a pipe:

    ("add", torrent, save_path) -> None     seed a torrent's files in place
    ("remove", info_hash) -> None           stop seeding it (the files stay)
    ("uploaded", info_hash) -> int         payload bytes sent for it
    ("errors",) -> [str]                    libtorrent's error alerts since the last call

Every call has a deadline (:data:`CALL_TIMEOUT`). serve supervises the child: a child that
died, or that missed a deadline (it is killed), is started again on the same port with the
same torrents, so that the plans already handed out still name the right seed; a counter
that came from a child since replaced is kept, so the seed's bytes in the metrics never
go backwards. The child ends with serve: it stops when the pipe closes (serve exited, even
killed) and is a daemon process (serve's normal exit ends it); it ignores SIGINT and
SIGTERM, which serve gets too.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import ConfigError, CorralError

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from corral.deploy.transports.bittorrent import Torrent

log = logging.getLogger("corral.deploy")

#: Seconds the child has to start libtorrent and listen.
READY_TIMEOUT = 20.0
#: Seconds a call may take before the child is deemed hung, killed and started again.
CALL_TIMEOUT = 5.0


def _serve(conn: Connection, address: str, port: int) -> None:
    """The child: one libtorrent session, answering serve's calls until the pipe closes."""
    # Ctrl-C, and a stop sent to serve's whole process group (systemd's, the testbed's),
    # are serve's to handle: it reads the seed's last count, then closes the pipe. A
    # child that died of them first was started again by serve's shutdown, which then
    # logged the session's seeding as 0 bytes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from corral.deploy.transports.bittorrent import Seeder, import_libtorrent

    try:
        seeder = Seeder(import_libtorrent(), address, port)
    except CorralError as exc:
        conn.send(("error", exc.message, exc.hint))
        return
    conn.send(("ready", seeder.port))
    try:
        while True:
            try:
                op, *args = conn.recv()
            except (EOFError, OSError):
                break  # serve is gone
            if op == "add":
                seeder.add(args[0], Path(args[1]))
                conn.send(None)
            elif op == "remove":
                seeder.remove(args[0])
                conn.send(None)
            elif op == "uploaded":
                conn.send(seeder.uploaded(args[0]))
            elif op == "errors":
                conn.send(seeder.errors())
    finally:
        seeder.close()


class SeedProcess:
    """The seed as serve sees it: :class:`~corral.deploy.transports.bittorrent.Seeder`'s
    calls, each answered by the child process (see the module's docstring)."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._torrents: dict[bytes, tuple[Torrent, Path]] = {}
        #: bytes each torrent's seeding sent from children since replaced, and the last
        #: count the current child gave
        self._before: dict[bytes, int] = {}
        self._last: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.restarts = 0
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._start()
        log.info("BitTorrent seed on %s:%d, in process %d", address, self.port, self.pid)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None and self._proc.pid else 0

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        conn, child = context.Pipe()
        proc = context.Process(
            target=_serve, args=(child, self.address, self.port), name="corral-seed", daemon=True
        )
        proc.start()
        child.close()
        try:
            ready = conn.recv() if conn.poll(READY_TIMEOUT) else None
        except (EOFError, OSError):
            ready = None
        if ready is None or ready[0] != "ready":
            proc.kill()
            proc.join(5)
            conn.close()
            if ready is not None:
                raise ConfigError(ready[1], ready[2])
            raise ConfigError(
                f"the BitTorrent seed did not start within {READY_TIMEOUT:.0f} s "
                f"(exit code {proc.exitcode})",
                "see corral serve's log; or use another transport",
            )
        self._proc, self._conn, self.port = proc, conn, int(ready[1])
        for torrent, save_path in self._torrents.values():
            conn.send(("add", torrent, str(save_path)))
            conn.recv()

    def _restart(self, why: str) -> None:
        """Replace a dead or hung child (under the lock)."""
        self._stop_child()
        for key, count in self._last.items():
            self._before[key] = self._before.get(key, 0) + count
        self._last.clear()
        self.restarts += 1
        log.warning("BitTorrent seed: %s; starting it again on port %d", why, self.port)
        self._start()

    def _call(self, *message: Any, default: Any = None) -> Any:
        with self._lock:
            proc, conn = self._proc, self._conn
            if proc is None or conn is None:
                return default  # closed
            if not proc.is_alive():
                self._restart(f"its process ended (exit code {proc.exitcode})")
                conn = self._conn
                assert conn is not None
            try:
                conn.send(message)
                if conn.poll(CALL_TIMEOUT):
                    return conn.recv()
                why = f"no answer to '{message[0]}' in {CALL_TIMEOUT:.0f} s"
            except (EOFError, OSError) as exc:
                why = f"its pipe broke ({exc})"
            self._restart(why)
            return default

    def add(self, torrent: Torrent, save_path: Path) -> None:
        with self._lock:
            self._torrents[torrent.info_hash] = (torrent, save_path)
        self._call("add", torrent, str(save_path))

    def remove(self, key: bytes) -> None:
        with self._lock:
            self._torrents.pop(key, None)
        self._call("remove", key)

    def uploaded(self, key: bytes) -> int:
        count = self._call("uploaded", key)
        with self._lock:
            if count is not None:
                self._last[key] = int(count)
            return self._before.get(key, 0) + self._last.get(key, 0)

    def errors(self) -> list[str]:
        found: list[str] = self._call("errors", default=[])
        return found

    def _stop_child(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()  # the child's recv ends: it closes its session and exits
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def close(self) -> None:
        with self._lock:
            self._stop_child()
