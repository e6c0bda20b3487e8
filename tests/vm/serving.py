"""`corral serve` for VM tests: DHCP, TFTP and HTTP in a network namespace with a bridge
that the test VMs' taps join, a given ramdisk, and a given cluster applied."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.run import stop as stop_process
from corral.testbed.netns import PxeNetwork, namespace_pids, run_prefix
from tests.conftest import corral


@dataclass
class Server:
    net: PxeNetwork
    home: Path
    log: Path

    def status(self, node: str) -> str:
        result = corral("node", "status", node, home=self.home)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def event_rows(self, node: str) -> list[tuple[str, str, str]]:
        """(phase, message, source) of what the node reported."""
        with sqlite3.connect(self.home / "corral.db") as db:
            rows = db.execute(
                "SELECT phase, message, source FROM node_event WHERE node = ? ORDER BY time, id",
                (node,),
            ).fetchall()
        return [(str(p), str(m), str(s)) for p, m, s in rows]

    def events(self, node: str) -> str:
        """``phase|message|source`` lines of what the node reported."""
        return "\n".join("|".join(row) for row in self.event_rows(node))

    def facts(self, node: str) -> dict[str, Any]:
        with sqlite3.connect(self.home / "corral.db") as db:
            row = db.execute(
                "SELECT s.facts FROM node_state s JOIN node n ON n.id = s.node_id WHERE n.name = ?",
                (node,),
            ).fetchone()
        assert row is not None and row[0], f"no facts for {node}"
        facts = json.loads(row[0])
        assert isinstance(facts, dict)
        return facts


@contextmanager
def corral_server(
    name: str,
    cluster: str,
    kernel: Path,
    initrd: Path,
    images: Path | None = None,
    config: str = "",
) -> Iterator[Server]:
    """Serve ``cluster`` with ``kernel``/``initrd`` as the ramdisk; stopped with SIGTERM,
    which must end corral (exit 0) and everything it started. ``images``: an image store
    to serve from (linked into the home, so that an image built once serves many runs);
    ``config``: more lines of corral.toml."""
    # dnsmasq reads its files as 'nobody': the home must be world-readable.
    work = Path(tempfile.mkdtemp(prefix="corral-vm-"))
    work.chmod(0o755)
    home = work / "home"
    try:
        (home / "ramdisk").mkdir(parents=True)
        shutil.copyfile(kernel, home / "ramdisk" / "vmlinuz")
        shutil.copyfile(initrd, home / "ramdisk" / "initrd.img")
        (home / "corral.toml").write_text("dhcp_ipv6_ra = true\n" + config)
        if images is not None:
            (home / "images").symlink_to(images)
        (work / "cluster.yaml").write_text(cluster)
        applied = corral("apply", "-f", str(work / "cluster.yaml"), home=home)
        assert applied.returncode == 0, applied.stderr
        log = work / "serve.log"
        with PxeNetwork(
            run_prefix() + name, address="10.88.0.1/24", address6="fd00:88::1/64"
        ) as net:
            argv = ["serve", "--address", "10.88.0.1", "--http-port", "8080", "--tftp-port",
                    "69", "--dhcp", "full", "--dhcp-interface", net.bridge, "--dhcp-range",
                    "10.88.0.100,10.88.0.150"]  # fmt: skip
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    net.exec([sys.executable, "-m", "corral", *argv]),
                    env=dict(os.environ, CORRAL_HOME=str(home)),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                deadline = time.monotonic() + 90
                while "Application startup complete" not in log.read_text():
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                yield Server(net, home, log)
            finally:
                stop_process(proc, 20)
            # SIGTERM is a clean stop: corral ended its dnsmasq before exiting.
            assert proc.returncode == 0, log.read_text()[-2000:]
            assert namespace_pids(net.name) == [], "something corral started outlived it"
    finally:
        shutil.rmtree(work, ignore_errors=True)
