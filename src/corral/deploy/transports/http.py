"""The ``http`` transport: corral's own HTTP server streams the chunked export
(``/images/NAME/VERSION/chunks/N.bin``, with Range requests); nothing to start."""

from __future__ import annotations

from typing import Any

from corral.config import Settings
from corral.deploy.transports.base import Unicast
from corral.images.exports import Chunked


class HttpTransport(Unicast):
    name = "http"
    export = "stream"

    def __init__(self, settings: Settings) -> None:
        self.server = settings.server_url.rstrip("/")
        self._checked: set[str] = set()

    def prepare(self, payload: Chunked) -> None:
        """Check every chunk against the manifest once, before the first byte is served."""
        if payload.ref not in self._checked:
            payload.verify()
            self._checked.add(payload.ref)

    def params(self, payload: Chunked, node: str) -> dict[str, Any]:
        return {"base": f"{self.server}{payload.url_path}"}

    def close(self) -> None:
        pass
