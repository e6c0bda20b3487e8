"""corral's TFTP server: boot loaders from a directory, per-node files made on request.

Built on fbtftp, Facebook's framework for dynamic TFTP servers: its listener parses read
requests and its handler supplies per-transfer state, block reading and netascii. corral
adds what fbtftp lacks or gets wrong for a provisioning server:

* the windowsize option (RFC 7440) beside blksize (RFC 2348), tsize and timeout (RFC 2349),
  with every option value validated and clamped;
* confinement to the root (``..``, backslashes and symlinks cannot leave it) and refusal of
  write requests, both answered with "access violation";
* transfers in threads instead of fbtftp's forked processes, so the resolver and logging
  stay in this process and :meth:`TftpServer.stop` can end and join every transfer;
* one log line per transfer on the ``corral.tftp`` logger, and a :class:`Transferred` to
  the server's ``on_done`` (corral serve stores the boot steps from it).
"""

from __future__ import annotations

import collections
import io
import logging
import os
import posixpath
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fbtftp.base_handler import BaseHandler, ResponseData  # type: ignore[import-untyped]
from fbtftp.base_server import BaseServer  # type: ignore[import-untyped]
from fbtftp.netascii import NetasciiReader  # type: ignore[import-untyped]

__all__ = ["Resolver", "TftpServer", "Transferred"]

log = logging.getLogger("corral.tftp")

Resolver = Callable[[str, str], bytes | None]
"""(normalised relative path, client IP) -> the file's content, or None for the static file."""


@dataclass(frozen=True)
class Transferred:
    """How one read request ended: ``failure`` is None when the client acknowledged the
    whole file, else why not ("file not found", "timeout after 5 retransmissions").
    ``probe``: the client asked for the file's size and ended the transfer before any data,
    as PXE ROMs do before they fetch a file for real."""

    path: str
    client_ip: str
    bytes: int
    failure: str | None
    probe: bool = False


# Opcodes (RFC 1350, RFC 2347).
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
# Error codes (RFC 1350, RFC 2347).
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL, ERR_UNKNOWN_TID = 0, 1, 2, 4, 5

DEFAULT_TIMEOUT = 1  # seconds without an ACK before retransmitting
DEFAULT_RETRIES = 5  # retransmissions of one window before giving up
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349
# RFC 7440 allows up to 65535; a window is held in memory until acknowledged
# (64 x 65464 bytes = 4 MiB per transfer at most) and gains flatten out well before 64.
MAX_WINDOWSIZE = 64
MAX_TRANSFERS = 256  # concurrent transfers; further requests get "server busy"
_POLL = 0.2  # seconds a transfer waits for a packet before checking for stop()
_MAX_DATAGRAM = 65536


class _Refusal(Exception):
    """A request answered with a TFTP error packet instead of a file."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _normalise(filename: str) -> str | None:
    """The requested name relative to the root, or None when it would escape the root.

    Backslashes count as separators (some PXE clients send DOS paths) and leading slashes
    are dropped, so ``/pxelinux.0`` and ``pxelinux.0`` name the same file.
    """
    name = filename.replace("\\", "/").lstrip("/")
    if not name:
        return None
    norm = posixpath.normpath(name)
    if norm in (".", "..") or norm.startswith(("/", "../")):
        return None
    return norm


def _parse_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


class _Content(ResponseData):  # type: ignore[misc]
    """A readable stream of known size: a static file or a resolver's bytes."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size

    def read(self, n: int) -> bytes:
        return self._stream.read(n)

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self._stream.close()


def _open_static(root: str, rel: str) -> _Content:
    """Open ``root/rel`` for reading, refusing anything that resolves outside ``root``."""
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root:
        raise _Refusal(ERR_ACCESS, "Access violation")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(real, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise _Refusal(ERR_NOT_FOUND, "File not found") from None
    except OSError:  # permission denied, a symlink swapped in (ELOOP), ...
        raise _Refusal(ERR_ACCESS, "Access violation") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _Refusal(ERR_ACCESS, "Access violation")
    return _Content(os.fdopen(fd, "rb"), info.st_size)


def _error_packet(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


class _Transfer(BaseHandler):  # type: ignore[misc]
    """One read request, served in a thread; adds windowsize to fbtftp's handler.

    fbtftp's constructor calls :meth:`get_response_data`, so the resolver runs in the
    transfer's own thread, not in the listener's.
    """

    _response_data: Any  # set by fbtftp's constructor, wrapped for netascii

    def __init__(
        self,
        owner: TftpServer,
        server_addr: tuple[str, int],
        peer: tuple[str, int],
        path: str,
        mode: str,
        requested: dict[str, str],
    ) -> None:
        self._owner = owner
        self._requested = requested
        self._refusal: _Refusal | None = None
        self._window = 1
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self._eof = False
        self._oack: dict[str, str] = {}
        self._started = False  # the client has acknowledged the OACK (or there was none)
        self._delivered = 0  # bytes in acknowledged blocks
        self._outcome = "incomplete"
        self._level = logging.WARNING
        self._began = time.monotonic()
        options = {"mode": mode, "default_timeout": owner.timeout, "retries": owner.retries}
        super().__init__(server_addr, peer, path, options, lambda _stats: None)

    # fbtftp hook: called by BaseHandler.__init__ with self._path and self._peer set.
    def get_response_data(self) -> ResponseData:
        try:
            return self._owner._lookup(self._path, self._peer[0])
        except _Refusal as refusal:
            self._refusal = refusal
            return _Content(io.BytesIO(b""), 0)

    def run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("tftp transfer of %r to %s failed", self._path, self._peer[0])
            self._outcome, self._level = "internal error", logging.ERROR
        finally:
            self._finish()

    # -- the transfer ------------------------------------------------------------------

    def _serve(self) -> None:
        sock = self._get_listener()
        sock.settimeout(_POLL)
        if self._refusal is not None:
            self._refuse(self._refusal)
            return
        try:
            oack = self._negotiate()
        except _Refusal as refusal:
            self._refuse(refusal)
            return
        if oack:
            self._oack = oack
            self._send(self._oack_packet())
        else:
            self._started = True
            self._fill_window()
        self._reset_timeout()
        while not self._should_stop:
            if self._owner._stopping.is_set():
                self._send(_error_packet(ERR_UNDEFINED, "Server shutting down"))
                self._outcome = "aborted: server stopping"
                return
            self._receive()
            if not self._should_stop and time.time() > self._expire_ts:
                self._on_timeout()

    def _negotiate(self) -> dict[str, str]:
        """Apply the options the client asked for; return those to acknowledge (RFC 2347)."""
        mode = self._options["mode"]
        if mode == "netascii":
            self._response_data = NetasciiReader(self._response_data)
        elif mode != "octet":
            raise _Refusal(ERR_ILLEGAL, f"Unsupported mode {mode!r}")
        oack: dict[str, str] = {}
        for name, value in self._requested.items():
            number = _parse_int(value)
            if name == "blksize" and number is not None and number >= MIN_BLKSIZE:
                self._block_size = min(number, MAX_BLKSIZE)
                oack[name] = str(self._block_size)
            elif name == "tsize":
                oack[name] = str(self._response_data.size())
            elif name == "timeout" and number is not None and MIN_TIMEOUT <= number <= MAX_TIMEOUT:
                self._timeout = number
                oack[name] = str(number)
            elif name == "windowsize" and number is not None and number >= 1:
                self._window = min(number, MAX_WINDOWSIZE)
                oack[name] = str(self._window)
        return oack

    def _receive(self) -> None:
        try:
            data, peer = self._get_listener().recvfrom(_MAX_DATAGRAM)
        except TimeoutError:
            return
        if (peer[0], peer[1]) != (self._peer[0], self._peer[1]):
            self._send(_error_packet(ERR_UNKNOWN_TID, "Unknown transfer ID"), peer)
            return
        if len(data) < 4:
            return
        opcode, number = struct.unpack("!HH", data[:4])
        if opcode == ACK:
            self._on_ack(number)
        elif opcode == ERROR:
            message = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
            self._outcome = f"aborted by client: error {number} {message!r}"
            self._should_stop = True
        else:
            self._send(_error_packet(ERR_ILLEGAL, "Illegal TFTP operation"))
            self._outcome = f"aborted: client sent opcode {opcode}"
            self._should_stop = True

    def _on_ack(self, number: int) -> None:
        if not self._started:
            if number == 0:  # the OACK arrived
                self._started = True
                self._retransmits = 0
                self._reset_timeout()
                self._fill_window()
            return
        position = next((i for i, (n, _) in enumerate(self._unacked) if n == number), None)
        if position is None:
            return  # a duplicate or stale ACK: ignore it (no Sorcerer's Apprentice)
        for _ in range(position + 1):
            self._delivered += len(self._unacked.popleft()[1])
        self._retransmits = 0
        self._reset_timeout()
        if self._eof and not self._unacked:
            self._outcome, self._level = "ok", logging.INFO
            self._should_stop = True
            return
        # An ACK inside the window means the block after it was lost: RFC 7440 resends
        # from there. An ACK of the whole window leaves nothing to resend.
        for block, data in self._unacked:
            self._send_block(block, data)
        self._fill_window()

    def _fill_window(self) -> None:
        while not self._eof and len(self._unacked) < self._window:
            self._next_block()  # fbtftp: reads one block, advances (and wraps) the number
            if self._should_stop:  # fbtftp already sent the client an error
                self._outcome, self._level = "read error", logging.ERROR
                return
            data = bytes(self._current_block)
            self._unacked.append((self._last_block_sent, data))
            self._send_block(self._last_block_sent, data)
            if len(data) < self._block_size:
                self._eof = True

    def _on_timeout(self) -> None:
        if self._retransmits >= self._retries:
            self._outcome = f"timeout after {self._retries} retransmissions"
            self._should_stop = True
            return
        self._retransmits += 1
        if not self._started:
            self._send(self._oack_packet())
        else:
            for block, data in self._unacked:
                self._send_block(block, data)
        self._reset_timeout()

    # -- packets, refusals and the log line --------------------------------------------

    def _oack_packet(self) -> bytes:
        body = b"".join(
            name.encode("ascii") + b"\0" + value.encode("ascii") + b"\0"
            for name, value in self._oack.items()
        )
        return struct.pack("!H", OACK) + body

    def _send_block(self, block: int, data: bytes) -> None:
        self._send(struct.pack("!HH", DATA, block) + data)

    def _send(self, packet: bytes, to: Any = None) -> None:
        self._get_listener().sendto(packet, self._peer if to is None else to)

    def _refuse(self, refusal: _Refusal) -> None:
        self._send(_error_packet(refusal.code, refusal.message))
        self._outcome = f"refused: {refusal.message.lower()}"
        self._level = logging.INFO if refusal.code == ERR_NOT_FOUND else logging.WARNING

    def _result(self) -> Transferred:
        outcome = self._outcome
        failure = None if outcome == "ok" else outcome.removeprefix("refused: ")
        path = _normalise(self._path) or self._path
        probe = outcome.startswith("aborted by client") and not self._delivered
        return Transferred(path, self._peer[0], self._delivered, failure, probe)

    def _finish(self) -> None:
        try:
            if self._response_data is not None:
                self._response_data.close()
        finally:
            self._get_listener().close()
        self._owner._done(self._result())
        log.log(
            self._level,
            "tftp client=%s:%d path=%r bytes=%d outcome=%s blksize=%d windowsize=%d %.3fs",
            self._peer[0],
            self._peer[1],
            self._path,
            self._delivered,
            self._outcome,
            self._block_size,
            self._window,
            time.monotonic() - self._began,
        )


class _Launch:
    """What fbtftp's listener starts for each read request: a thread, not a process."""

    daemon = True  # set by fbtftp; transfer threads are always daemonic

    def __init__(
        self,
        owner: TftpServer,
        server_addr: tuple[str, int],
        peer: Any,
        path: str,
        options: dict[str, Any],
    ) -> None:
        self._owner = owner
        self._args = (server_addr, peer, path, options)

    def start(self) -> None:
        self._owner._spawn(*self._args)


class _Listener(BaseServer):  # type: ignore[misc]
    """fbtftp's listener, plus refusal of write requests and a wake-up for stop()."""

    def __init__(self, owner: TftpServer, host: str, port: int) -> None:
        super().__init__(host, port, owner.retries, owner.timeout)
        self._owner = owner
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    @property
    def bound_port(self) -> int:
        return int(self._listener.getsockname()[1])

    def restart_stats_timer(self, run_once: bool = False) -> None:
        """No statistics timer thread: corral logs each transfer instead."""

    def get_handler(
        self, server_addr: tuple[str, int], peer: Any, path: str, options: dict[str, Any]
    ) -> _Launch:
        return _Launch(self._owner, server_addr, peer, path, options)

    def on_new_data(self) -> None:
        try:
            self._on_new_data()
        except Exception:
            log.exception("tftp: error handling a request")

    def _on_new_data(self) -> None:
        try:
            data, peer = self._listener.recvfrom(_MAX_DATAGRAM, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        opcode = struct.unpack("!H", data[:2])[0] if len(data) >= 4 else 0
        if opcode == RRQ:
            super().on_new_data()  # fbtftp parses it and calls get_handler()
            return
        self._listener.recvfrom(_MAX_DATAGRAM)  # consume it
        if opcode == 0:
            return  # too short to be TFTP
        if opcode == WRQ:
            name = data[2:].split(b"\0", 1)[0].decode("latin-1")
            log.warning("tftp client=%s:%d path=%r refused: write request", peer[0], peer[1], name)
            self.reply(_error_packet(ERR_ACCESS, "Access violation"), peer)
        elif opcode not in (DATA, ACK, ERROR, OACK):  # strays are dropped silently
            self.reply(_error_packet(ERR_ILLEGAL, "Illegal TFTP operation"), peer)

    def reply(self, packet: bytes, peer: Any) -> None:
        self._listener.sendto(packet, peer)

    def wake(self) -> None:
        self._wake_w.send(b"\0")

    def close_wake(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


class TftpServer:
    """A read-only TFTP server for ``root``, with ``resolver`` consulted first.

    ``resolver(path, client_ip)`` gets the normalised relative path and returns the
    content to send, or None to serve ``root/path`` from disk. ``host`` is an IP address
    (IPv4 or IPv6); ``port=0`` binds a free port, see :attr:`port`. ``on_done`` is given
    how each transfer ended, in the transfer's thread, after the client has it.
    """

    def __init__(
        self,
        root: Path,
        resolver: Resolver | None,
        host: str = "0.0.0.0",
        port: int = 69,
        on_done: Callable[[Transferred], None] | None = None,
    ) -> None:
        self._root = Path(root)
        self._on_done = on_done
        self._root_real = ""
        self._resolver = resolver
        self._host = host
        self._port = port
        self.timeout = DEFAULT_TIMEOUT
        self.retries = DEFAULT_RETRIES
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._transfers: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._port

    def start(self) -> None:
        """Bind the socket and serve in background threads; returns once bound."""
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError("TftpServer can be started only once")
        root = os.path.realpath(self._root)
        if not os.path.isdir(root):
            raise NotADirectoryError(f"TFTP root {self._root} is not a directory")
        self._root_real = root
        self._listener = _Listener(self, self._host, self._port)
        self._port = self._listener.bound_port
        self._thread = threading.Thread(
            target=self._listener.run, name=f"corral-tftp-{self._port}", daemon=True
        )
        self._thread.start()
        log.info("tftp serving %s on %s port %d", self._root, self._host, self._port)

    def stop(self) -> None:
        """Stop serving: end transfers, join all threads, close all sockets. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        listener, thread = self._listener, self._thread
        if listener is None or thread is None:
            return
        listener.close()  # fbtftp: ends its loop at the next wake-up
        listener.wake()
        thread.join()
        listener.close_wake()
        while True:
            with self._lock:
                transfers = list(self._transfers)
            if not transfers:
                break
            for transfer in transfers:
                transfer.join()
        log.info("tftp stopped on port %d", self._port)

    # -- called from the listener and transfer threads -----------------------------------

    def _spawn(
        self, server_addr: tuple[str, int], peer: Any, path: str, options: dict[str, Any]
    ) -> None:
        listener = self._listener
        assert listener is not None
        with self._lock:
            if self._stopping.is_set():
                return
            if len(self._transfers) < MAX_TRANSFERS:
                thread = threading.Thread(
                    target=self._transfer,
                    args=(server_addr, peer, path, options),
                    name="corral-tftp-transfer",
                    daemon=True,
                )
                self._transfers.add(thread)
                thread.start()
                return
        log.warning("tftp client=%s:%d path=%r refused: server busy", peer[0], peer[1], path)
        listener.reply(_error_packet(ERR_UNDEFINED, "Server busy"), peer)

    def _transfer(
        self, server_addr: tuple[str, int], peer: Any, path: str, options: dict[str, Any]
    ) -> None:
        try:
            mode = str(options.get("mode", "octet")).lower()
            fbtftp_keys = ("mode", "default_timeout", "retries")
            requested = {str(k).lower(): str(v) for k, v in options.items() if k not in fbtftp_keys}
            _Transfer(self, server_addr, peer, path, mode, requested).run()
        except Exception:
            log.exception("tftp transfer of %r to %s failed", path, peer[0])
        finally:
            with self._lock:
                self._transfers.discard(threading.current_thread())

    def _done(self, result: Transferred) -> None:
        if self._on_done is None or self._stopping.is_set():
            return
        try:
            self._on_done(result)
        except Exception:
            log.exception(
                "tftp: handling the end of %r to %s failed", result.path, result.client_ip
            )

    def _lookup(self, requested: str, client: str) -> _Content:
        """The content for a request: the resolver's, else the static file; or a refusal."""
        rel = _normalise(requested)
        if rel is None:
            raise _Refusal(ERR_ACCESS, "Access violation")
        if self._resolver is not None:
            try:
                content = self._resolver(rel, client)
            except PermissionError:  # the resolver refuses this client (it logs why)
                raise _Refusal(ERR_ACCESS, "Access violation") from None
            except Exception:
                log.exception("tftp resolver failed for %r from %s", rel, client)
                raise _Refusal(ERR_UNDEFINED, "Internal server error") from None
            if content is not None:
                return _Content(io.BytesIO(content), len(content))
        return _open_static(self._root_real, rel)
