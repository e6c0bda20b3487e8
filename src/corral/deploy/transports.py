"""How image bytes leave the server: one small interface, and a registry of transports.

A server transport gets an image version ready to serve (:meth:`ServerTransport.prepare`,
called once per version and again after a restart) and tells each node's agent how to
receive it (:meth:`ServerTransport.params`, which becomes the plan's
``transport.params``). The agent's side of each transport is in
:mod:`corral.agent.receive`, under the same name.

- ``http``: corral's own HTTP server streams the chunked export
  (``/images/NAME/VERSION/chunks/N.bin``, with Range requests); nothing to start.
- ``rsync``: one rsync daemon started by corral, with a read-only module per image
  version; a node re-deployed with a newer version of its image receives only what changed.

Broadcast transports (multicast, BitTorrent, chain) register here the same way.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral.config import Settings
from corral.errors import ConfigError
from corral.images.exports import verify_export
from corral.images.store import ImageVersion
from corral.run import spawn

log = logging.getLogger("corral.deploy")


@dataclass(frozen=True)
class Member:
    """A node in a transfer session: its name and the address it receives on."""

    node: str
    ip: str | None


class ServerTransport(Protocol):
    """The server's side of a transport.

    The manager calls :meth:`prepare` for each image version a deployment needs, then
    :meth:`start` once per session (the nodes of one deployment that get the same image by
    this transport) before it reboots them, and :meth:`finish` when every node of the
    session has ended; after a restart of corral serve, :meth:`start` is called again with
    the nodes still going. :meth:`params` goes into each node's plan.
    """

    name: str
    #: the export the transport sends: "stream" (chunked tar) or "tree"
    export: str

    def prepare(self, version: ImageVersion) -> None: ...

    def start(self, deployment: int, version: ImageVersion, members: Sequence[Member]) -> None: ...

    def params(self, version: ImageVersion, node: str) -> dict[str, Any]: ...

    def finish(self, deployment: int, version: ImageVersion) -> None: ...

    def close(self) -> None: ...


class Unicast:
    """Sessions mean nothing to a transport that serves each node on its own."""

    def start(self, deployment: int, version: ImageVersion, members: Sequence[Member]) -> None:
        pass

    def finish(self, deployment: int, version: ImageVersion) -> None:
        pass


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


def rsync_module(version: ImageVersion) -> str:
    return f"{version.name}-{version.version}"


class RsyncTransport(Unicast):
    """An rsync daemon whose config lists a read-only module per prepared version.

    The daemon reads its config again for every connection, so adding a module is
    rewriting the file (atomically); the daemon is only started once, and again if it died.
    """

    name = "rsync"
    export = "tree"

    def __init__(self, settings: Settings) -> None:
        self.dir = settings.home / "rsync"
        self.address = settings.address
        self.port = settings.rsync_port
        self.host = _url_host(settings.server_url)
        self.modules: dict[str, Path] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def prepare(self, version: ImageVersion) -> None:
        with self._lock:
            if not version.rootfs.is_dir():
                raise ConfigError(f"image {version.ref} has no tree: {version.rootfs} is missing")
            if self.modules.get(rsync_module(version)) != version.rootfs:
                self.modules[rsync_module(version)] = version.rootfs
                self._write_config()
            if self.proc is None or self.proc.poll() is not None:
                self._start()

    def params(self, version: ImageVersion, node: str) -> dict[str, Any]:
        return {"url": f"rsync://{self.host}:{self.port}/{rsync_module(version)}/"}

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "# written by corral serve for its deployments; rewritten as they change",
            f"pid file = {self.dir / 'rsyncd.pid'}",
            "use chroot = yes",
            "numeric ids = yes",
            "read only = yes",
            "list = no",
            "uid = 0",
            "gid = 0",
            "timeout = 60",
            "max connections = 0",
            "",
        ]
        for module, path in sorted(self.modules.items()):
            lines += [f"[{module}]", f"    path = {path}", "    comment = corral image", ""]
        tmp = self.dir / "rsyncd.conf.tmp"
        tmp.write_text("\n".join(lines))
        os.replace(tmp, self.dir / "rsyncd.conf")

    def _start(self) -> None:
        argv = [
            "rsync",
            "--daemon",
            "--no-detach",
            f"--config={self.dir / 'rsyncd.conf'}",
            f"--port={self.port}",
            f"--log-file={self.dir / 'rsyncd.log'}",
        ]
        if self.address not in ("", "0.0.0.0"):
            argv.append(f"--address={self.address}")
        (self.dir / "rsyncd.pid").unlink(missing_ok=True)
        self.proc = spawn(argv)
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise ConfigError(
                f"the rsync daemon did not start on port {self.port} (see "
                f"{self.dir / 'rsyncd.log'})",
                "free the port or set rsync_port in corral.toml",
            )
        log.info("rsync daemon on port %d (pid %d)", self.port, self.proc.pid)

    def close(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "localhost"


Factory = Callable[[Settings], ServerTransport]

#: name -> factory; the order is the order of ``--transport`` choices in help texts.
REGISTRY: dict[str, Factory] = {
    "http": HttpTransport,
    "rsync": RsyncTransport,
}


def register(name: str, factory: Factory) -> None:
    REGISTRY[name] = factory


def names() -> list[str]:
    return list(REGISTRY)


class Transports:
    """The transports one server runs, each made on first use and closed at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._live: dict[str, ServerTransport] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ServerTransport:
        with self._lock:
            if name not in self._live:
                self._live[name] = REGISTRY[name](self.settings)
            return self._live[name]

    def close(self) -> None:
        with self._lock:
            for transport in self._live.values():
                try:
                    transport.close()
                except Exception:
                    log.exception("closing transport %s", transport.name)
            self._live.clear()


#: Modules of further transports; each calls :func:`register` when imported.
BUILTIN: tuple[str, ...] = (
    "corral.deploy.bittorrent",
    "corral.deploy.chain",
    "corral.deploy.multicast",
)

for _module in BUILTIN:
    importlib.import_module(_module)
