"""The monitoring API on a real uvicorn: the event history, the live stream (SSE) with
resume and the dropping of a client that does not read, the snapshot of live views, and
the per-phase timeouts with their machine-readable reasons."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
from fastapi import FastAPI

from corral.agent import phases
from corral.config import Settings
from corral.deploy.service import DeployService
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.integration.conftest import serving

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def service(fixture_cluster: None, settings: Settings) -> BootService:
    return BootService(settings, db.engine())


@pytest.fixture
def app(service: BootService) -> FastAPI:
    return create_app(service, "admin-secret")


@pytest.fixture
def url(app: FastAPI) -> Iterator[str]:
    with serving(app) as url:
        yield url


def record(node: str, phase: str, message: str = "", **more: object) -> None:
    with db.session() as s:
        NodeStates(s).record(node, phase, message, "test", **more)  # type: ignore[arg-type]


def sse(lines: Iterator[str], count: int, timeout: float = 10) -> list[tuple[str, dict]]:
    """The next ``count`` messages (event name, data) of a stream."""
    got: list[tuple[str, dict]] = []
    name, deadline = "", time.monotonic() + timeout
    for line in lines:
        assert time.monotonic() < deadline, f"only {got} in {timeout} s"
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            got.append((name, json.loads(line[6:])))
            if len(got) == count:
                return got
    raise AssertionError(f"stream ended after {got}")


def test_events_are_kept_and_listed_with_filters(url: str) -> None:
    record("c01", phases.BOOTED, "up")
    record("bonded", phases.BOOTED, "up")
    record("c01", phases.FAILED, "disk gone", reason=phases.NODE_ERROR, log="line 1\nline 2")
    with httpx.Client(base_url=url, headers=ADMIN) as client:
        everything = client.get("/api/v1/events").json()
        assert [e["phase"] for e in everything] == ["booted", "booted", "failed"]
        mine = client.get("/api/v1/events", params={"node": "c01"}).json()
        assert [e["node"] for e in mine] == ["c01", "c01"]
        failed = mine[-1]
        assert failed["reason"] == "node-error"
        assert failed["during"] == "booted"
        assert failed["log"] == "line 1\nline 2"
        assert failed["time"][:4].isdigit() and "T" in failed["time"]  # ISO 8601
        after = client.get("/api/v1/events", params={"after": mine[0]["id"]}).json()
        assert [e["node"] for e in after] == ["bonded", "c01"]
        assert client.get("/api/v1/events", params={"since": "1h"}).json() == everything
        assert client.get("/api/v1/events", params={"since": "2999-01-01T00:00"}).json() == []
        bad = client.get("/api/v1/events", params={"since": "yesterday"})
        assert bad.status_code == 422
        assert "15m" in bad.json()["hint"]
        assert httpx.get(f"{url}/api/v1/events").status_code == 401


def test_the_stream_delivers_events_and_progress_live(app: FastAPI, url: str) -> None:
    with (
        httpx.Client(base_url=url, headers=ADMIN, timeout=10) as client,
        client.stream("GET", "/api/v1/events/stream", params={"node": "c01"}) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        record("bonded", phases.BOOTED)  # not asked for
        record("c01", phases.BOOTED, "ramdisk up")
        app.state.hub.progress(
            {"node": "c01", "deployment": 3, "phase": "receiving", "bytes": 10, "total": 100}
        )
        (kind, event), (kind2, progress) = sse(lines, 2)
        assert (kind, event["node"], event["phase"], event["message"]) == (
            "event",
            "c01",
            "booted",
            "ramdisk up",
        )
        assert kind2 == "progress"
        assert progress["bytes"] == 10 and progress["deployment"] == 3
    # a client that comes back with Last-Event-ID gets what it missed, then the live ones
    record("c01", phases.WAITING, "missed")
    with (
        httpx.Client(base_url=url, headers=ADMIN, timeout=10) as client,
        client.stream(
            "GET",
            "/api/v1/events/stream",
            params={"node": "c01", "progress": "false"},
            headers={"Last-Event-ID": str(event["id"])},
        ) as stream,
    ):
        lines = stream.iter_lines()
        record("c01", phases.PARTITIONING, "live")
        got = sse(lines, 2)
        assert [(d["phase"], d["message"]) for _, d in got] == [
            ("waiting", "missed"),
            ("partitioning", "live"),
        ]


def test_a_client_that_never_reads_is_dropped(
    app: FastAPI, url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("corral.serve.monitor.SEND_TIMEOUT", 1.0)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        sock.sendall(
            b"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer admin-secret\r\n\r\n"
        )
        big = "x" * 3000
        deadline = time.monotonic() + 30
        while "dropped: it read nothing" not in caplog.text:
            assert time.monotonic() < deadline, "the silent client was never dropped"
            for i in range(300):  # megabytes the client never reads
                app.state.hub.progress({"node": "c01", "deployment": 1, "phase": big, "bytes": i})
            time.sleep(0.2)
            # meanwhile the server answers everyone else
            answer = httpx.get(f"{url}/api/v1/status", headers=ADMIN, timeout=5)
            assert answer.status_code == 200
    finally:
        sock.close()


def test_status_is_what_a_live_view_starts_from(url: str) -> None:
    record("c01", phases.BOOTED)
    record("c01", phases.FAILED, "no disk", reason=phases.TIMEOUT)
    with httpx.Client(base_url=url, headers=ADMIN) as client:
        rows = client.get("/api/v1/status").json()["nodes"]
        c01 = next(r for r in rows if r["node"] == "c01")
        assert (c01["state"], c01["phase"], c01["reason"]) == ("failed", "failed", "timeout")
        assert c01["since"] and "T" in c01["since"]
        only = client.get("/api/v1/status", params={"nodes": "c01,bonded"}).json()["nodes"]
        assert [r["node"] for r in only] == ["bonded", "c01"]
        assert client.get("/api/v1/status", params={"nodes": "zz9"}).status_code == 404


def test_a_phase_past_its_timeout_fails_the_node_with_its_reason(
    service: BootService, settings: Settings
) -> None:
    deploy = DeployService(
        replace(settings, timeout_pre_install=5.0, timeout_pxe=5.0),
        service.session,
        service.authorize,
    )
    record("c01", phases.BOOTED)
    record("c01", phases.PRE_INSTALL, "anaconda runs %pre")
    record("bonded", phases.DHCP, "10.0.0.12 (DHCPACK)")
    record("bonded", phases.LOADER, "undionly.kpxe over TFTP")
    deploy._phase_timeouts_at(time.time() + 3)  # not yet
    with db.session() as s:
        assert NodeStates(s).status("c01").state == "installing"
    deploy._phase_timeouts_at(time.time() + 10)
    with db.session() as s:
        states = NodeStates(s)
        c01, c02 = states.status("c01"), states.status("bonded")
        failed = {
            e.node: e for e in states.events("c01") + states.events("bonded") if e.phase == "failed"
        }
    assert c01.state == "failed" and "timeout_pre_install (5 s)" in (c01.message or "")
    assert (failed["c01"].reason, failed["c01"].during) == ("timeout", "pre-install")
    assert c02.state == "failed"
    assert "loader undionly.kpxe over TFTP at" in (c02.message or "")
    assert "never asked for its boot configuration" in (c02.message or "")
    assert (failed["bonded"].reason, failed["bonded"].during) == ("timeout", "loader")


def test_events_of_other_processes_reach_the_hub_and_old_ones_expire(
    service: BootService,
) -> None:
    from sqlalchemy import insert

    from corral.inventory import models as m
    from corral.serve.events import Hub, Tail

    hub = Hub()
    tail = Tail(hub, service.session, retention_days=1)
    tail.tick()  # it starts from the newest event
    tail._pruned = 0.0  # and its next pass deletes expired events again
    with db.session() as s:  # as the CLI would: rows this process's hub never saw
        s.execute(
            insert(m.NodeEvent),
            [
                {
                    "node": "c01",
                    "time": time.time(),
                    "phase": "armed",
                    "message": "re-armed",
                    "source": "admin",
                },
                {
                    "node": "c01",
                    "time": time.time() - 3 * 86400,
                    "phase": "booted",
                    "message": "long ago",
                    "source": "10.0.0.11",
                },
            ],
        )
    tail.tick()
    messages, lost = hub.after(0)
    assert not lost
    assert [json.loads(msg.data.split(b"data: ")[1])["message"] for msg in messages] == [
        "re-armed",
        "long ago",
    ]
    with db.session() as s:
        kept = [e.message for e in NodeStates(s).events("c01")]
    assert kept == ["re-armed"]  # older than event_retention_days: deleted
    tail.tick()
    assert hub.after(messages[-1].seq) == ([], False)  # each published once
