"""The ``rsync`` transport: one rsync daemon started by corral, with a read-only module per
image version; a node re-deployed with a newer version of its image receives only what
changed."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from corral.config import Settings
from corral.deploy.transports.base import Unicast, url_host
from corral.errors import ConfigError
from corral.images.exports import Chunked
from corral.images.store import ImageVersion
from corral.run import spawn, stop

log = logging.getLogger("corral.deploy")


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
        self.host = url_host(settings.server_url)
        self.modules: dict[str, Path] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def prepare(self, payload: Chunked) -> None:
        if payload.export != "stream":
            raise ConfigError(
                f"rsync sends an image's tree, not its {payload.export}",
                "boot diskless nodes by http, multicast, chain or bittorrent",
            )
        version = payload.image
        with self._lock:
            if not version.rootfs.is_dir():
                raise ConfigError(f"image {version.ref} has no tree: {version.rootfs} is missing")
            if self.modules.get(rsync_module(version)) != version.rootfs:
                self.modules[rsync_module(version)] = version.rootfs
                self._write_config()
            if self.proc is None or self.proc.poll() is not None:
                self._start()

    def params(self, payload: Chunked, node: str) -> dict[str, Any]:
        return {"url": f"rsync://{self.host}:{self.port}/{rsync_module(payload.image)}/"}

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
            if self.proc is not None:
                stop(self.proc, 5)
            self.proc = None
