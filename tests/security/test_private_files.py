"""Item 6 of issue 12: the database and secrets are 0600 in 0700 directories, and
``corral serve --dhcp full`` works in such a home (dnsmasq, which drops root, reads its
hosts file from a directory of its own); when dnsmasq fails, the error is one line."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.deploy.keys import host_keys
from corral.inventory import db
from corral.inventory.schema import InterfaceSpec, NodeSpec
from corral.serve.assets import api_token
from corral.serve.dhcp import dnsmasq_user
from corral.serve.server import dhcp_hosts_dir
from tests.integration.test_dhcp import MAC1, NODE1, SERVER_IP, Net, net, udhcpc

__all__ = ["net"]  # a fixture, used by name

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (dnsmasq, namespaces)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_database_token_and_keys_are_private(home: Path) -> None:
    db.engine()
    with db.inventory() as inv:  # something written: the WAL file exists
        inv.add("node", [NodeSpec(name="n1")])
    api_token(home)
    keys = host_keys(home, "n1")
    assert mode(home) == 0o700
    assert mode(home / "corral.db") == 0o600
    assert mode(home / "corral.db-wal") == 0o600
    assert mode(home / "api-token") == 0o600
    assert mode(home / "keys") == 0o700 and mode(home / "keys" / "n1") == 0o700
    assert mode(home / "keys" / "n1" / "ssh_host_ed25519_key") == 0o600
    assert "PRIVATE KEY" in keys["ssh_host_ed25519_key"]


def test_an_existing_readable_database_and_token_are_made_private(home: Path) -> None:
    home.mkdir(mode=0o755)
    (home / "corral.db").touch(mode=0o644)
    (home / "api-token").write_text("t0ken\n")
    (home / "api-token").chmod(0o644)
    db.engine()
    assert api_token(home) == "t0ken"
    assert mode(home / "corral.db") == 0o600
    assert mode(home / "api-token") == 0o600


def serve_in(net: Net, interface: str) -> list[str]:
    """``corral serve`` with DHCP in the namespace of ``net``'s server."""
    return [
        "ip", "netns", "exec", net.server, sys.executable, "-m", "corral", "serve",
        "--address", SERVER_IP, "--http-port", "18080", "--tftp-port", "16969",
        "--dhcp", "full", "--dhcp-interface", interface,
    ]  # fmt: skip


@pytest.mark.integration
@as_root
def test_serve_with_dhcp_in_a_private_home_under_umask_077(home: Path, net: Net) -> None:
    home.mkdir(mode=0o700)
    with db.inventory() as inv:
        inv.add(
            "node", [NodeSpec(name="node01", interfaces=[InterfaceSpec(mac=MAC1, ip=NODE1.ip)])]
        )
    log = home.parent / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            serve_in(net, "br0"),
            env=dict(os.environ, CORRAL_HOME=str(home)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.umask(0o077),
        )
    try:
        deadline = time.monotonic() + 60
        while "DHCP (full) on br0" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        env = udhcpc(net, mac=MAC1)
        assert env is not None and env["ip"] == NODE1.ip, log.read_text()
        assert mode(home) == 0o700 and mode(home / "dhcp") == 0o700
        assert mode(home / "corral.db") == 0o600
        hosts = dhcp_hosts_dir(db.settings()) / "dhcp-hosts"
        assert f"{MAC1},{NODE1.ip},node01" in hosts.read_text()
        assert mode(hosts) == 0o600 and hosts.stat().st_uid == pwd.getpwnam(dnsmasq_user()).pw_uid
        assert mode(hosts.parent) == 0o711 and hosts.parent.stat().st_uid == 0
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "corral serve stopped" in text and "Traceback" not in text
    assert not hosts.parent.exists()


@pytest.mark.integration
@as_root
def test_a_failing_dnsmasq_is_a_one_line_error(home: Path, net: Net) -> None:
    result = subprocess.run(
        serve_in(net, "cdhnope0"),  # no such interface: dnsmasq exits at once
        env=dict(os.environ, CORRAL_HOME=str(home)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cdhnope0" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
