"""Talking to corral's server: JSON requests and binary downloads with a bearer token,
retried with backoff."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from corral.agent.errors import AgentError

log = logging.getLogger("corral.agent")

#: The longest wait between two tries (s).
MAX_DELAY = 10.0

#: HTTP statuses worth another try; any other 4xx is an answer that will not change.
_RETRY_STATUS = (408, 425, 429)


class ReportError(AgentError):
    """A report did not reach the server, or the server refused it."""


class Rejected(ReportError):
    """The server answered with a client error (bad token, unknown node, bad body)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Client:
    """Talks JSON to ``server`` (``http://host:port[/prefix]``) and downloads from it.

    ``tries`` attempts, sleeping ``backoff``, 2x``backoff``, 4x``backoff``... between them.
    """

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        tries: int = 5,
        backoff: float = 1.0,
        timeout: float = 15.0,
        sleep: Callable[[float], None] = time.sleep,
        patience: float = 0.0,
    ) -> None:
        url = urllib.parse.urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ReportError(f"bad server URL {server!r}: expected http://host[:port]")
        self.server = server.rstrip("/")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.token = token
        self.tries = max(1, tries)
        self.patience = patience
        self.backoff = backoff
        self.timeout = timeout
        self.sleep = sleep
        # one kept-alive connection per thread (the progress reporter's, the receiver's):
        # a new TCP connection per report cost the server a handshake and a close for
        # each, 100 a second with 100 nodes
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        return self._connection_to(self.scheme, self.host, self.port)

    def _connection_to(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        if scheme == "https":
            import ssl

            context = ssl.create_default_context()
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _send_once(
        self, method: str, path: str, body: bytes | None, auth: bool
    ) -> tuple[int, bytes]:
        headers = {"Accept": "application/json", "User-Agent": "corral-agent"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        kept: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        conn = kept or self._connection()
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            if kept is None:
                raise
            # a kept connection the server has closed meanwhile (corral serve closes idle
            # ones after 15 s): once more on a new one, not counted as a try (the agent's
            # requests are idempotent: a report states where the node stands)
            return self._send_once(method, path, body, auth)
        if response.will_close:
            conn.close()
        else:
            self._local.conn = conn
        return response.status, data

    def close(self) -> None:
        """Close this thread's kept connection, if any."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _attempts(self) -> Iterator[tuple[int, bool]]:
        """(attempt number, whether it is the last): ``tries`` of them, and more while
        within ``patience`` seconds of the first (a server restarting mid-install is back
        within that)."""
        start = time.monotonic()
        attempt = 1
        while True:
            last = attempt >= self.tries and time.monotonic() - start >= self.patience
            yield attempt, last
            if last:
                return
            attempt += 1

    def _retry(self, what: str, attempt: int, last: bool, error: str) -> None:
        """Sleep before the next try, unless that was the last; the caller then raises."""
        if last:
            return
        delay = min(self.backoff * 2 ** (attempt - 1), MAX_DELAY)
        log.warning("%s failed (try %d): %s; again in %.0f s", what, attempt, error, delay)
        self.sleep(delay)

    def _json(self, method: str, path: str, body: bytes | None, auth: bool) -> tuple[int, Any]:
        what = f"{method} {self.server}{path}"
        error = ""
        for attempt, last in self._attempts():
            try:
                status, data = self._send_once(method, path, body, auth)
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                text = data.decode("utf-8", "replace")
                if 200 <= status < 300:
                    try:
                        return status, json.loads(text) if text.strip() else None
                    except ValueError:
                        return status, text
                if 400 <= status < 500 and status not in _RETRY_STATUS:
                    raise Rejected(status, text)
                error = f"HTTP {status}: {text[:200]}"
            self._retry(what, attempt, last, error)
        raise ReportError(f"{what} failed {attempt} times: {error}")

    def post(self, path: str, payload: dict[str, Any], *, auth: bool = True) -> Any:
        """POST ``payload`` as JSON to ``path``; return the decoded JSON answer.

        Raises :class:`Rejected` at once for a 4xx answer, :class:`ReportError` when every
        try failed (connection errors, timeouts, 5xx).
        """
        return self._json("POST", path, json.dumps(payload).encode(), auth)[1]

    def get(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        """GET ``path``; return ``(status, decoded JSON or None)``.

        The status is returned because 204 ("nothing for you yet") means something different
        from a 200 with a body. Errors as for :meth:`post`.
        """
        return self._json("GET", path, None, auth)

    def download(self, url: str, *, start: int = 0, auth: bool = True) -> Download:
        """Open a binary GET of ``url`` (absolute, or a path on the server), from byte
        ``start`` on (``Range: bytes=start-``).

        Only opening is retried (connection errors, 5xx, with backoff); a connection that
        drops while its body is read is the caller's to resume, since only the caller knows
        how many bytes it kept. The answer may be 200 (whole body: the server ignored the
        range) or 206. Raises :class:`Rejected` for a 4xx answer.
        """
        target = urllib.parse.urlsplit(url)
        if target.scheme:
            if target.scheme not in ("http", "https") or not target.hostname:
                raise ReportError(f"bad download URL {url!r}")
            scheme = target.scheme
            host = target.hostname
            port = target.port or (443 if scheme == "https" else 80)
            path = target.path or "/"
        else:
            scheme, host, port, path = self.scheme, self.host, self.port, self.prefix + url
        if target.query:
            path += "?" + target.query
        headers = {"User-Agent": "corral-agent", "Accept": "application/octet-stream"}
        if start:
            headers["Range"] = f"bytes={start}-"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        what = f"GET {url}" + (f" from byte {start}" if start else "")
        error = ""
        for attempt, last in self._attempts():
            conn = self._connection_to(scheme, host, port)
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status in (200, 206):
                    return Download(conn, response, start if response.status == 206 else 0)
                text = response.read(4096).decode("utf-8", "replace")
                conn.close()
                if 400 <= response.status < 500 and response.status not in _RETRY_STATUS:
                    raise Rejected(response.status, text)
                error = f"HTTP {response.status}: {text[:200]}"
            self._retry(what, attempt, last, error)
        raise ReportError(f"{what} failed {attempt} times: {error}")


class Download:
    """An open binary answer; ``offset`` is where its first byte sits in the whole file."""

    def __init__(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, offset: int
    ) -> None:
        self._conn = conn
        self.response = response
        self.status = response.status
        self.offset = offset
        length = response.getheader("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, size: int = 1 << 16) -> bytes:
        """Up to ``size`` bytes; b"" at the end. Raises OSError or
        http.client.HTTPException when the connection breaks."""
        return self.response.read1(size)

    @property
    def complete(self) -> bool:
        """Whether the body ended where the server said it would (a connection that broke
        early ends the body too, but short of its Content-Length)."""
        return self.response.length in (None, 0)

    def close(self) -> None:
        self.response.close()
        self._conn.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
