"""A real ``corral serve`` in a subprocess on loopback, for the security tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.run import stop as stop_process


@dataclass
class Served:
    url: str
    port: int
    log: Path  # what corral serve wrote (stdout and stderr)
    proc: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def corral_serve(home: Path, *args: str, umask: int | None = None) -> Iterator[Served]:
    """``corral serve --address 127.0.0.1`` (no TFTP unless asked), answering HTTP; it
    is stopped (SIGTERM, then SIGKILL) whatever happens."""
    port = free_tcp_port()
    log = home.parent / f"serve-{port}.log"
    argv = [sys.executable, "-m", "corral", "serve", "--address", "127.0.0.1"]
    argv += ["--http-port", str(port), *(args or ("--tftp-port", "0"))]
    env = dict(os.environ, CORRAL_HOME=str(home))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        )
    served = Served(f"http://127.0.0.1:{port}", port, log, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{served.url}/boot/ipxe", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"corral serve did not come up:\n{served.output()}"
                    ) from None
                time.sleep(0.2)
        yield served
    finally:
        stop_process(proc, 20)
