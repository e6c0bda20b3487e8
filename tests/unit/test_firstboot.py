"""The installed system's first-boot report: the unit and script the agent leaves in it,
the script run for real by bash (with curl, and without: bash's /dev/tcp) against a local
HTTP server, and the agent not rebooting into a disk its install left broken."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.agent import firstboot
from corral.agent.cmdline import BootOrders
from corral.agent.main import Agent, Paths
from tests.unit.test_agent import Recorder
from tests.unit.test_agent import server as server  # the recording HTTP server fixture

TOKEN = "tok-123"


def installed_root(tmp_path: Path, url: str) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "etc").mkdir()
    assert firstboot.has_systemd(root)
    written = firstboot.install(root, url, "n07", TOKEN)
    assert set(written) == {
        firstboot.TOKEN,
        firstboot.ENV,
        firstboot.SCRIPT,
        firstboot.UNIT,
        firstboot.WANTS,
    }
    return root


def test_the_unit_runs_once_after_multi_user(tmp_path: Path) -> None:
    root = installed_root(tmp_path, "http://10.0.0.1:8080")
    unit = (root / firstboot.UNIT).read_text()
    assert "After=network-online.target multi-user.target" in unit
    assert f"ConditionPathExists=/{firstboot.TOKEN}" in unit  # gone once reported
    assert "WantedBy=multi-user.target" in unit
    assert os.readlink(root / firstboot.WANTS) == f"/{firstboot.UNIT}"
    assert (root / firstboot.TOKEN).stat().st_mode & 0o777 == 0o600
    assert (root / firstboot.SCRIPT).stat().st_mode & 0o777 == 0o755
    env = (root / firstboot.ENV).read_text()
    assert env == (
        "CORRAL_SERVER=http://10.0.0.1:8080\nCORRAL_NODE=n07\nCORRAL_PHASE=first-boot\n"
        "CORRAL_WHAT='its installed system'\n"
    )
    assert not firstboot.has_systemd(tmp_path / "nothing")


def _script_in(root: Path) -> Path:
    """The script, reading its files under ``root`` rather than the real /etc."""
    text = firstboot.SCRIPT_TEXT.replace("/etc/corral/", f"{root}/etc/corral/")
    path = root / "first-boot-test"
    path.write_text(text)
    path.chmod(0o755)
    return path


def _tools_without_curl(tmp_path: Path) -> str:
    """A PATH with what the script uses, curl left out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "tr", "cut", "hostname", "uname", "seq", "sleep", "rm", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


@pytest.mark.parametrize("with_curl", [True, False], ids=["curl", "bash-dev-tcp"])
def test_the_script_reports_and_spends_its_token(
    server: Recorder, tmp_path: Path, with_curl: bool
) -> None:
    if with_curl and shutil.which("curl") is None:
        pytest.fail("curl is installed by make setup")
    root = installed_root(tmp_path, server.url)
    server.script = [503]  # the server is not ready at first: the script tries again
    path = os.environ["PATH"] if with_curl else _tools_without_curl(tmp_path)
    result = subprocess.run(
        ["bash", str(_script_in(root))],
        env={"PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "attempt 1 failed" in result.stderr
    assert len(server.requests) == 2
    request = server.requests[-1]
    assert request["path"] == "/api/v1/nodes/n07/events"
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert request["content_type"] == "application/json"
    body = request["body"]
    assert isinstance(body, dict) and body["phase"] == "first-boot"
    assert f"kernel {os.uname().release}" in body["message"]
    assert not (root / firstboot.TOKEN).exists()  # the unit will not run again


def test_a_failed_install_does_not_reboot_into_its_disk(tmp_path: Path) -> None:
    """corral.agent_exit=reboot is for a good install: after a failure the ramdisk stays
    up (its console, log and corral's status say why) rather than boot a broken disk."""
    orders = BootOrders.from_cmdline("corral.agent_exit=reboot")
    agent = Agent(orders, Paths(run=tmp_path))
    commands: list[list[str]] = []
    waited: list[bool] = []
    agent.command = lambda argv, timeout=60: commands.append(list(argv)) or 0  # type: ignore[method-assign]
    agent.wait_for_instructions = lambda: waited.append(True)  # type: ignore[method-assign]
    assert agent.finish(failed=True) == 0
    assert commands == [] and waited == [True]
    assert agent.finish(failed=False) == 0
    assert commands == [["reboot", "-f"]]
