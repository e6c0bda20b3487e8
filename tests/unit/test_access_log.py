"""corral serve's access log: the agents' high-rate requests are left out unless asked for."""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from corral.config import Settings, load_settings
from corral.errors import ConfigError
from corral.serve import server
from corral.serve.server import QuietAgentTraffic, access_log_mode


def access_record(method: str, path: str, status: int) -> logging.LogRecord:
    """A record as uvicorn's HTTP protocols log it."""
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("10.0.0.11:40000", method, path, "1.1", status),
        None,
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/images/base/3/chunks/00000012.bin", 200),
        ("GET", "/images/base/3/chunks/00000012.bin", 206),
        ("GET", "/images/base/3/chunks/7.bin?x=1", 200),
        ("GET", "/images/base/3/squashfs/chunks/00000002.bin", 200),
        ("POST", "/api/v1/deployments/4/nodes/n001/progress", 200),
    ],
)
def test_agent_traffic_is_dropped(method: str, path: str, status: int) -> None:
    assert not QuietAgentTraffic().filter(access_record(method, path, status))


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/boot/ipxe", 200),
        ("GET", "/boot/52:54:00:00:00:01.ipxe", 200),
        ("GET", "/ks/n001", 200),
        ("GET", "/api/v1/nodes/n001/plan", 204),
        ("POST", "/api/v1/nodes/n001/events", 200),
        ("GET", "/api/v1/deployments/4", 200),
        ("POST", "/api/v1/deployments/4/cancel", 200),
        ("GET", "/images/base/3/index.json", 200),
        # the agents' failures are news
        ("GET", "/images/base/3/chunks/00000012.bin", 403),
        ("POST", "/api/v1/deployments/4/nodes/n001/progress", 404),
    ],
)
def test_other_requests_and_failures_are_kept(method: str, path: str, status: int) -> None:
    assert QuietAgentTraffic().filter(access_record(method, path, status))


def test_records_of_another_shape_are_kept() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "hello", None, None)
    assert QuietAgentTraffic().filter(record)


def test_mode_defaults_to_quiet_and_debug_shows_all(tmp_path: Path) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert access_log_mode(Settings(home=tmp_path)) == "quiet"
        assert access_log_mode(Settings(home=tmp_path, access_log="off")) == "off"
        root.setLevel(logging.DEBUG)
        assert access_log_mode(Settings(home=tmp_path)) == "all"
        assert access_log_mode(Settings(home=tmp_path, access_log="off")) == "off"
    finally:
        root.setLevel(level)


def test_bad_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="access_log"):
        access_log_mode(Settings(home=tmp_path, access_log="some"))


def test_mode_is_read_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    (tmp_path / "corral.toml").write_text('access_log = "all"\n')
    assert load_settings(tmp_path).access_log == "all"
    (tmp_path / "corral.toml").write_text("access_log = false\n")
    with pytest.raises(ConfigError, match="must be a str"):
        load_settings(tmp_path)


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    # read the request's body first, as any app does: answering a POST with its body
    # unread, uvicorn closed the connection on it, and the client's read of the answer
    # was reset now and then (a fresh-clone CI run)
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def uvicorn_url() -> Iterator[str]:
    """A real uvicorn server logging access, so that the filter meets uvicorn's records."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_ok, log_config=None, access_log=True, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        assert server.started
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_uvicorn_access_lines_are_filtered(
    uvicorn_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    access = logging.getLogger("uvicorn.access")
    quiet = QuietAgentTraffic()
    access.addFilter(quiet)
    try:
        for path in ("/images/base/1/chunks/00000000.bin", "/boot/ipxe"):
            with urllib.request.urlopen(uvicorn_url + path) as response:
                assert response.read() == b"ok"
        request = urllib.request.Request(
            uvicorn_url + "/api/v1/deployments/1/nodes/n001/progress", data=b"{}"
        )
        with urllib.request.urlopen(request) as response:
            response.read()
    finally:
        access.removeFilter(quiet)
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert len(lines) == 1
    assert '"GET /boot/ipxe HTTP/1.1" 200' in lines[0]


@pytest.mark.parametrize(
    ("limits", "raised"),
    [
        ((1024, 524288), (65536, 524288)),  # a systemd service's usual limits
        ((1024, 4096), (4096, 4096)),  # no more than the hard limit allows
        ((1024, resource.RLIM_INFINITY), (65536, resource.RLIM_INFINITY)),
        ((100_000, 524288), None),  # already enough: left alone
    ],
)
def test_corral_serve_asks_for_enough_open_files_for_thousands_of_nodes(
    monkeypatch: pytest.MonkeyPatch, limits: tuple[int, int], raised: tuple[int, int] | None
) -> None:
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: limits)
    monkeypatch.setattr(resource, "setrlimit", lambda _which, value: set_to.append(value))
    server._more_open_files()
    assert set_to == ([] if raised is None else [raised])
