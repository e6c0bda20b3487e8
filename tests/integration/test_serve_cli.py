"""`corral serve` refuses what it cannot do with one clear line, and stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import corral

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


def free_port(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


@pytest.mark.parametrize("proto", ["tftp", "http"])
def test_busy_port_is_a_one_line_error(tmp_path: Path, proto: str) -> None:
    kind = socket.SOCK_DGRAM if proto == "tftp" else socket.SOCK_STREAM
    with free_port(kind) as busy:
        port = str(busy.getsockname()[1])
        ports = (
            ["--tftp-port", port, "--http-port", "0"]
            if proto == "tftp"
            else ["--tftp-port", "0", "--http-port", port]
        )
        result = corral("serve", "--address", "127.0.0.1", *ports, home=tmp_path / "home")
    assert result.returncode == 2
    assert f"error: cannot listen for {proto.upper()} on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dhcp", "sometimes"], "bad --dhcp 'sometimes'"),
        (["--dhcp", "full"], "--dhcp needs --dhcp-interface"),
    ],
)
def test_bad_dhcp_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = corral("serve", "--tftp-port", "0", "--http-port", "0", *args, home=tmp_path / "home")
    assert result.returncode == 2
    assert message in result.stderr


def test_sigterm_stops_serve_cleanly(tmp_path: Path) -> None:
    with free_port(socket.SOCK_STREAM) as probe:
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral",
            "serve",
            "--address",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--tftp-port",
            "0",
        ],
        env=dict(os.environ, CORRAL_HOME=str(tmp_path / "home")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:  # an answer, not just a connection: the socket listens before uvicorn runs
                httpx.get(f"http://127.0.0.1:{port}/boot/ipxe", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "corral serve stopped" in out
