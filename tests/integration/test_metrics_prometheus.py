"""/metrics scraped by a real Prometheus server (Debian's ``prometheus``, started by the
test, not its systemd unit) from corral's app on a real uvicorn, with the admin token as
Prometheus sends it, and read back through Prometheus's HTTP API. Needs
``/usr/bin/prometheus`` (``make setup``): a missing one fails the test."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from corral.agent import phases
from corral.config import Settings
from corral.inventory import db
from corral.inventory import models as m
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.fakes import free_port
from tests.integration.conftest import serving

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]
PROMETHEUS = Path("/usr/bin/prometheus")
TOKEN = "admin-secret"
CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: corral
    authorization:
      credentials: {token}
    static_configs:
      - targets: ["127.0.0.1:{corral}"]
  - job_name: corral-wrong-token
    authorization:
      credentials: not-the-token
    static_configs:
      - targets: ["127.0.0.1:{corral}"]
"""


@pytest.fixture
def app(fixture_cluster: None, settings: Settings) -> FastAPI:
    return create_app(BootService(settings, db.engine()), TOKEN)


@pytest.fixture
def corral_port(app: FastAPI) -> Iterator[int]:
    """corral's app on a real uvicorn, as corral serve runs it."""
    with serving(app) as url:
        yield int(url.rpartition(":")[2])


@pytest.fixture
def prometheus(corral_port: int, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server of the test's own, scraping corral every second; its URL."""
    assert PROMETHEUS.exists(), "prometheus is not installed: apt-get install prometheus"
    config = tmp_path / "prometheus.yml"
    config.write_text(CONFIG.format(token=TOKEN, corral=corral_port))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"prometheus not ready: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def seen(prometheus: str, expected: dict[str, float], timeout: float = 15) -> None:
    """Until Prometheus has each query's value as expected (each query one series)."""
    deadline = time.monotonic() + timeout
    while True:
        got: dict[str, float | None] = {}
        for promql in expected:
            result = query(prometheus, promql)
            got[promql] = float(result[0]["value"][1]) if len(result) == 1 else None
        if got == expected:
            return
        assert time.monotonic() < deadline, f"Prometheus has {got}, not {expected}"
        time.sleep(0.25)


def record(node: str, phase: str, source: str = "test", **more: Any) -> None:
    with db.session() as s:
        NodeStates(s).record(node, phase, "", source, **more)


def test_prometheus_scrapes_corral_with_the_token(prometheus: str, corral_port: int) -> None:
    # the token is required: Prometheus scrapes with it, and without it is refused
    seen(prometheus, {'up{job="corral"}': 1, 'up{job="corral-wrong-token"}': 0})
    assert httpx.get(f"http://127.0.0.1:{corral_port}/metrics").status_code == 401
    seen(prometheus, {'corral_nodes{state="failed"}': 0, "corral_deployments_running": 0})

    record("c01", phases.DHCP, "dhcp")
    record("c01", phases.LOADER, "tftp")
    record("c01", phases.BOOTED, "10.0.0.11")
    record("bonded", phases.BOOTED, "10.0.0.12")
    record("bonded", phases.FAILED, reason=phases.POWER)
    with db.session() as s:  # a machine corral does not know asks for an address
        s.add(
            m.NodeEvent(
                node="",
                mac="52:54:00:ff:00:01",
                time=time.time(),
                phase=phases.DHCP,
                message="unknown",
                source="dhcp",
            )
        )

    seen(
        prometheus,
        {
            'corral_nodes{state="installing"}': 1,
            'corral_nodes{state="failed"}': 1,
            'corral_node_failures_total{reason="power",during="booted"}': 1,
            'corral_boot_requests_total{step="dhcp",source="dhcp",known="true"}': 1,
            'corral_boot_requests_total{step="dhcp",source="dhcp",known="false"}': 1,
            'corral_boot_requests_total{step="loader",source="tftp",known="true"}': 1,
            'corral_phase_duration_seconds_count{phase="dhcp"}': 1,
            'corral_phase_duration_seconds_count{phase="booted"}': 1,
            'sum(corral_phase_duration_seconds_bucket{phase="loader",le="+Inf"})': 1,
        },
    )
    # a live view connected: counted while it holds its stream
    with (
        httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client,
        client.stream("GET", f"http://127.0.0.1:{corral_port}/api/v1/events/stream") as stream,
    ):
        assert stream.status_code == 200
        seen(prometheus, {"corral_event_stream_clients": 1})
