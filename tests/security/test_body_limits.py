"""Item 5 of issue 12: request bodies are capped for every route, before authentication:
a declared Content-Length over the cap is refused unread, a chunked body is cut off."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.inventory import db
from corral.serve.boot import BootService
from corral.serve.http import create_app
from corral.serve.limits import MAX_BODY
from tests.security.serving import corral_serve

#: its integration tests share nothing of the host: `make test` runs them on every core
pytestmark = pytest.mark.parallel_safe

ROUTES = [
    "/api/v1/nodes",  # admin: needs the API token
    "/api/v1/nodes/c01/events",  # a node: needs its token
    "/api/v1/discover",  # open
    "/api/v1/deployments/1/nodes/c01/progress",
]


@pytest.fixture
def stranger(fixture_cluster: None, settings: Settings) -> Iterator[TestClient]:
    app = create_app(BootService(settings, db.engine()), "admin-secret")
    with TestClient(app, client=("10.0.0.99", 40000)) as c:
        yield c


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_over_the_cap_is_a_413_without_a_token(stranger: TestClient, path: str) -> None:
    answer = stranger.post(
        path, content=b"{" + b" " * MAX_BODY + b"}", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    assert "too large" in answer.json()["detail"]


def test_a_chunked_body_over_the_cap_is_a_413(stranger: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(3 * MAX_BODY // 65536):
            yield b" " * 65536

    answer = stranger.post("/api/v1/discover", content=chunks())
    assert answer.status_code == 413


def test_a_small_body_still_reaches_the_route(stranger: TestClient) -> None:
    assert stranger.post("/api/v1/nodes", json={"name": "x"}).status_code == 401


def exchange(port: int, head: bytes, body: Iterator[bytes] = iter(())) -> bytes:
    """Send ``head`` then ``body`` (as far as the server lets), return its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for piece in body:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


@pytest.mark.integration
def test_the_real_server_refuses_big_bodies_before_reading_them(home: Path) -> None:
    with corral_serve(home) as served:
        # 100 MB declared, none sent: the answer comes at once, before any token check
        declared = exchange(
            served.port,
            b"POST /api/v1/nodes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n",
        )
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        chunked = exchange(
            served.port,
            b"POST /api/v1/discover HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            iter([chunk] * 64),  # 4 MiB, if nobody stopped it
        )
        time.sleep(0.5)
        log = served.output()
    assert declared.startswith(b"HTTP/1.1 413 "), declared[:200]
    assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:200]
    assert "refused POST '/api/v1/nodes' from 127.0.0.1: the body declares 100000000" in log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
