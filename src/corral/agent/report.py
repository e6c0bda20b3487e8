"""Talking to corral's server: JSON POSTs with a bearer token, retried with backoff."""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

log = logging.getLogger("corral.agent")

#: Phases corral's server accepts in ``POST /api/v1/nodes/{node}/events``.
PHASES = ("booted", "pre-install", "post-install", "progress", "install-finished", "failed")

#: HTTP statuses worth another try; any other 4xx is an answer that will not change.
_RETRY_STATUS = (408, 425, 429)


class ReportError(Exception):
    """A report did not reach the server, or the server refused it."""


class Rejected(ReportError):
    """The server answered with a client error (bad token, unknown node, bad body)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Client:
    """POSTs JSON to ``server`` (``http://host:port[/prefix]``).

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
        self.backoff = backoff
        self.timeout = timeout
        self.sleep = sleep

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            import ssl

            context = ssl.create_default_context()
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _send_once(self, path: str, body: bytes, auth: bool) -> tuple[int, bytes]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "corral-agent",
        }
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection()
        try:
            conn.request("POST", self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, path: str, payload: dict[str, Any], *, auth: bool = True) -> Any:
        """POST ``payload`` as JSON to ``path``; return the decoded JSON answer.

        Raises :class:`Rejected` at once for a 4xx answer, :class:`ReportError` when every
        try failed (connection errors, timeouts, 5xx).
        """
        body = json.dumps(payload).encode()
        error = ""
        for attempt in range(1, self.tries + 1):
            try:
                status, data = self._send_once(path, body, auth)
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                text = data.decode("utf-8", "replace")
                if 200 <= status < 300:
                    try:
                        return json.loads(text) if text.strip() else None
                    except ValueError:
                        return text
                if 400 <= status < 500 and status not in _RETRY_STATUS:
                    raise Rejected(status, text)
                error = f"HTTP {status}: {text[:200]}"
            if attempt < self.tries:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning(
                    "POST %s%s failed (try %d of %d): %s; again in %.0f s",
                    self.server,
                    path,
                    attempt,
                    self.tries,
                    error,
                    delay,
                )
                self.sleep(delay)
        raise ReportError(f"POST {self.server}{path} failed {self.tries} times: {error}")
