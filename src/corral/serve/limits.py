"""How much a client may send: every request body is capped before anything reads it.

The cap is enforced below the routes, so it holds before authentication: a client
without a token cannot make corral read (and buffer) a large body only to refuse it.
A declared ``Content-Length`` over the cap is refused without reading a byte; a chunked
body is counted as it arrives and cut off at the cap. Both get 413.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("corral.serve")

#: Every body corral takes is small JSON: inventory entities, deployments, a node's
#: events, progress (with a log tail) and discovery facts.
MAX_BODY = 1 << 20


class BodyLimit:
    """ASGI middleware that answers 413 to a request whose body exceeds ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is None:
            await _refuse(send, 400, "bad Content-Length header")
            return
        if declared > self.max_bytes:
            self._log(scope, f"declares {declared} bytes")
            await _refuse(send, 413, self._detail())
            return
        state = {"received": 0, "refused": False, "started": False}

        async def limited_receive() -> Message:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["refused"] = True
                    self._log(scope, f"sent more than {self.max_bytes} bytes")
                    if not state["started"]:
                        await _refuse(send, 413, self._detail())
                        state["started"] = True
                    # the app sees a client that went away, and stops reading
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _detail(self) -> str:
        return f"request body too large: at most {self.max_bytes} bytes"

    def _log(self, scope: Scope, what: str) -> None:
        client = scope.get("client") or ("?", 0)
        log.warning(
            "refused %s %r from %s: the body %s",
            scope.get("method"),
            scope.get("path"),
            client[0],
            what,
        )


def _content_length(scope: Scope) -> int | None:
    """The declared length, 0 when there is none, None when it is malformed."""
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    if not values:
        return 0
    text = values[0].decode("latin-1").strip()
    if not text.isdigit() or any(v != values[0] for v in values):
        return None
    return int(text)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
