"""The web dashboard in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium), against corral's app on a real uvicorn: the login, the node grid, a
change that arrives over the event stream without a reload, a node's detail. Screenshots
go to ``$CORRAL_ARTIFACTS`` (default ``tests/artifacts/``) for people to look at."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update
from sqlalchemy.orm import Session

from corral.agent import phases
from corral.config import Settings
from corral.inventory import db
from corral.inventory import models as m
from corral.inventory.schema import GroupSpec, InterfaceSpec, NodeSpec
from corral.inventory.state import NodeStates
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.integration.conftest import serving

pytestmark = pytest.mark.integration
TOKEN = "admin-secret"
ARTIFACTS = Path(os.environ.get("CORRAL_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
WIDTH, HEIGHT = 1366, 768


# -- a cluster in many states -----------------------------------------------------------


def _add_nodes(count: int, racks: int = 5) -> list[str]:
    names = [f"n{i:04d}" if count > 999 else f"n{i:03d}" for i in range(1, count + 1)]
    per_rack = -(-count // racks)
    with db.inventory() as inv:
        inv.add("group", [GroupSpec(name=f"rack{r + 1}") for r in range(racks)])
        inv.add(
            "node",
            [
                NodeSpec(
                    name=name,
                    groups=[f"rack{i // per_rack + 1}"],
                    interfaces=[
                        InterfaceSpec(
                            mac=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                            ip=f"10.1.{(i + 1) >> 8}.{(i + 1) & 255}",
                            netmask="255.255.0.0",
                        )
                    ],
                )
                for i, name in enumerate(names)
            ],
        )
    return names


def _history(s: Session, node: str, steps: list[tuple[str, str, float]], **last: Any) -> None:
    """Record ``steps`` (phase, message, seconds ago) for ``node``, dated as given."""
    states = NodeStates(s)
    for index, (phase, message, ago) in enumerate(steps):
        more = last if index == len(steps) - 1 else {}
        states.record(node, phase, message, "10.1.0.9", **more)
        s.flush()
        newest = s.query(m.NodeEvent).filter_by(node=node).order_by(m.NodeEvent.id.desc()).first()
        assert newest is not None
        newest.time = time.time() - ago
    node_id = s.query(m.Node.id).filter_by(name=node).scalar()
    s.execute(
        update(m.NodeState)
        .where(m.NodeState.node_id == node_id)
        .values(updated=time.time() - steps[-1][2])
    )


INSTALL = [
    (phases.DHCP, "DHCP acknowledged 10.1.0.9", 900),
    (phases.LOADER, "sent ipxe.efi over TFTP", 898),
    (phases.BOOT_CONFIG, "sent its iPXE script", 897),
    (phases.KERNEL, "sent vmlinuz", 896),
    (phases.INITRD, "sent initrd.img", 890),
    (phases.BOOTED, "deploy ramdisk up: cpus=64 memory_mb=262144", 860),
    (phases.PARTITIONING, "GPT on /dev/nvme0n1", 850),
    (phases.RECEIVING, "image rocky9:3 over http", 840),
]


def populate(names: list[str], deployment_nodes: int = 40) -> int:
    """States for a picture of a busy cluster; returns the running deployment's id."""
    now = time.time()
    with db.session() as s:
        states = NodeStates(s)
        for i, name in enumerate(names):
            kind = i % 20
            if kind < 9:
                _history(s, name, [*INSTALL, (phases.INSTALL_FINISHED, "installed", 300 + i)])
            elif kind < 12:
                _history(s, name, INSTALL[:6])
            elif kind == 12:
                _history(
                    s,
                    name,
                    [*INSTALL, (phases.FAILED, "no space left on /dev/nvme0n1p2", 120)],
                    reason=phases.NODE_ERROR,
                    log="tar: ./usr/lib64/libLLVM.so.17: Cannot write: No space left on device\n"
                    "tar: Exiting with failure status due to previous errors\n"
                    "corral-agent: receiving failed (exit 2)",
                )
            elif kind == 13:
                _history(s, name, [(phases.DHCP, "DHCP acknowledged", 400)])
            elif kind == 14:
                _history(s, name, [*INSTALL, (phases.REBOOTING, "rebooting into it", 30)])
            elif kind == 15 and i % 40 == 15:
                _history(
                    s,
                    name,
                    [(phases.DHCP, "DHCP acknowledged", 700), (phases.BOOTED, "booted", 650)],
                )
                _history(
                    s,
                    name,
                    [(phases.FAILED, "no report for 600 s in phase booted", 50)],
                    reason=phases.TIMEOUT,
                )
            # the others: armed, never booted
            states.status(name)
        facts = {
            "cpus": 64,
            "memory_mb": 262144,
            "kernel": "6.1.0-28-amd64",
            "vendor": "Supermicro",
            "product": "SYS-2029U",
            "disks": [
                {"name": "nvme0n1", "size_bytes": 1_920_383_410_176, "model": "SAMSUNG MZQL21T9"},
                {"name": "sda", "size_bytes": 480_103_981_056, "model": "INTEL SSDSC2KB48"},
            ],
            "nics": [
                {"name": "eno1", "mac": "3c:ec:ef:10:00:01", "carrier": True, "driver": "ice"},
                {"name": "eno2", "mac": "3c:ec:ef:10:00:02", "carrier": False, "driver": "ice"},
            ],
        }
        for name in names[::20] + names[12::20]:  # installed ones, failed ones
            states._row(name).facts = facts
        dep = m.Deployment(
            created=now - 900,
            finished=None,
            state="running",
            noderange=f"{names[0]}-{names[deployment_nodes - 1]}",
            image="rocky9:3",
            transport="http",
            kind="install",
        )
        s.add(dep)
        s.flush()
        size = 4_200_000_000
        for i, name in enumerate(names[:deployment_nodes]):
            phase = ("done", "receiving", "receiving", "configuring", "failed")[i % 5]
            done = {"done": size, "configuring": size, "failed": size // 3}.get(phase, size // 2)
            s.add(
                m.DeploymentNode(
                    deployment_id=dep.id,
                    node=name,
                    image="rocky9:3",
                    transport="http",
                    phase=phase,
                    bytes=done,
                    total=size,
                    message="",
                    log_tail="",
                    started=now - 880,
                    updated=now - 5,
                    finished=None,
                )
            )
        return dep.id


# -- the server and the browser ---------------------------------------------------------


@pytest.fixture
def app(home: Path, settings: Settings) -> FastAPI:
    return create_app(BootService(settings, db.engine()), TOKEN)


@pytest.fixture
def url(app: FastAPI) -> Iterator[str]:
    with serving(app) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="corral-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # root, no GPU, and no internet here: without these Chromium keeps dialling out
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(flag)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(DRIVER))
        # the page gets the whole 1366x768, as a maximised window on such a screen would
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(what: str, check: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def log_in(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/dashboard")
    assert "admin token" in driver.page_source
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form button").click()
    wait("the dashboard", lambda: driver.find_elements(By.ID, "grid"))


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


# -- the tests -----------------------------------------------------------------------------


def test_the_dashboard_needs_the_admin_token(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        page = client.get("/dashboard")
        assert page.status_code == 401
        assert "api-token" in page.text and 'action="/dashboard/login"' in page.text
        assert client.get("/dashboard/lifecycle.json").status_code == 401
        assert client.get("/api/v1/nodes/n001/detail").status_code == 401
        wrong = client.post("/dashboard/login", data={"token": "guess"})
        assert wrong.status_code == 401 and "not the admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
        right = client.post("/dashboard/login", data={"token": TOKEN})
        assert right.status_code == 303 and right.headers["location"] == "/dashboard"
        cookie = right.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        page = client.get("/dashboard")  # the client keeps the cookie, as a browser does
        assert page.status_code == 200 and 'src="/dashboard/app.js"' in page.text
        assert "script-src" not in page.headers["content-security-policy"]  # 'self' only
        assert client.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/dashboard/nothing.js").status_code == 404
        out = client.post("/dashboard/logout")
        assert out.status_code == 303
        assert client.get("/dashboard").status_code == 401


def test_the_dashboard_follows_the_cluster_live_in_chromium(
    app: FastAPI, url: str, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    names = _add_nodes(200)
    deployment = populate(names)
    log_in(browser, url)
    wait("200 cells", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#grid .cell")) == 200)
    wait("live", lambda: browser.find_element(By.ID, "conn").get_attribute("data-state") == "live")

    def state_of(name: str) -> str:
        cell = browser.find_element(By.CSS_SELECTOR, f'#grid .cell[data-node="{name}"]')
        return str(cell.get_attribute("class"))

    assert "s-installed" in state_of("n001")
    assert "s-installing" in state_of("n010")
    assert "s-failed" in state_of("n013")
    assert "s-armed" in state_of("n017")
    counts = {
        chip.get_attribute("data-state"): chip.find_element(By.CSS_SELECTOR, ".n").text
        for chip in browser.find_elements(By.CSS_SELECTOR, "#legend .chip")
    }
    assert counts["failed"] == "15" and counts["installed"] == "90", counts

    js(browser, "window.notReloaded = true")
    with db.session() as s:  # n017 (armed) boots and fails: the page follows
        NodeStates(s).record("n017", phases.BOOTED, "ramdisk up", "10.1.0.17")
        NodeStates(s).record(
            "n017",
            phases.FAILED,
            "partitioning: /dev/sda is busy",
            "10.1.0.17",
            reason=phases.NODE_ERROR,
            log="sgdisk: /dev/sda: device busy",
        )
    wait("n017 failed", lambda: "s-failed" in state_of("n017"))
    wait("n017 listed", lambda: "n017" in browser.find_element(By.ID, "failures").text)
    for step in range(1, 6):  # progress moves the deployment's bars and chart
        for i in range(1, 40, 5):
            app.state.hub.progress(
                {
                    "node": names[i],
                    "deployment": deployment,
                    "phase": "receiving",
                    "bytes": 2_100_000_000 + step * 150_000_000,
                    "total": 4_200_000_000,
                }
            )
        time.sleep(0.25)
    member = f'.member[data-node="{names[1]}"] .pct'
    wait("n002 at 67%", lambda: browser.find_element(By.CSS_SELECTOR, member).text == "67%")
    assert js(browser, "return window.notReloaded") is True
    shot(browser, "dashboard-200-nodes")

    browser.find_element(By.CSS_SELECTOR, '#grid .cell[data-node="n013"]').click()
    drawer = browser.find_element(By.ID, "detail")
    wait("the detail", lambda: "Last lines of the node's log" in drawer.text)
    text = drawer.text
    assert "Failed: node-error" in text and "No space left on device" in text
    assert "receiving" in text and "phase durations" in text.lower()
    assert "Supermicro SYS-2029U" in text and "SAMSUNG MZQL21T9" in text
    shot(browser, "dashboard-node-detail")
    with db.session() as s:  # the open detail follows its node's events too
        NodeStates(s).arm(["n013"])
    wait("n013 re-armed", lambda: "re-armed for install" in drawer.text)
    assert js(browser, "return window.notReloaded") is True


def test_the_grid_stays_readable_at_1000_nodes(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    names = _add_nodes(1000, racks=10)
    populate(names, deployment_nodes=200)
    log_in(browser, url)
    wait("1000 cells", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#grid .cell")) == 1000)
    grid = browser.find_element(By.ID, "grid").rect
    assert grid["height"] < HEIGHT - 150, grid  # the whole grid fits on the first screen
    shot(browser, "dashboard-1000-nodes")
    browser.find_element(By.ID, "filter").send_keys("n0[100-199] failed")
    wait("the filter", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#grid .cell")) < 20)
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid .cell")
    assert cells and all("s-failed" in str(c.get_attribute("class")) for c in cells)
