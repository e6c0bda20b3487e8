"""The ``http`` transport: corral's own HTTP server streams the chunked export
(``/images/NAME/VERSION/chunks/N.bin``, with Range requests); nothing to start."""

from __future__ import annotations

from typing import Any

from corral.config import Settings
from corral.deploy.transports.base import Unicast
from corral.images.exports import verify_export
from corral.images.store import ImageVersion


class HttpTransport(Unicast):
    name = "http"
    export = "stream"

    def __init__(self, settings: Settings) -> None:
        self.server = settings.server_url.rstrip("/")
        self._checked: set[str] = set()

    def prepare(self, version: ImageVersion) -> None:
        """Check every chunk against the manifest once, before the first byte is served."""
        if version.ref not in self._checked:
            verify_export(version, "stream")
            self._checked.add(version.ref)

    def params(self, version: ImageVersion, node: str) -> dict[str, Any]:
        return {"base": f"{self.server}/images/{version.name}/{version.version}"}

    def close(self) -> None:
        pass
