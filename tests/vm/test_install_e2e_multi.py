"""Three empty machines installed in one multicast session, then one of them again over
http and over rsync: ``make vm-e2e`` (not in ``make test``: about 15 minutes of TCG).

Two VMs boot SeaBIOS and one OVMF (UEFI, with its own variable store, which survives the
VM's reboots). All three PXE-boot the deploy ramdisk, and `corral deploy --transport
multicast` installs the corral-built Debian 12 image on all three in one udpcast session.
Each reboots into its disk (BIOS: GRUB in the MBR and the BIOS boot partition; UEFI: the
ESP's removable path, no boot entry written), and each installed system reports its first
boot. Then e2e1 is installed again over http, and then over rsync with a newer version of
the image, of which rsync moves only what changed.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from corral.testbed.qemu import VM, Firmware
from tests.conftest import corral
from tests.vm.installing import (
    IMAGE,
    InstallBed,
    check_from_outside,
    empty_disk,
    install_bed,
    ssh,
)
from tests.vm.serving import Server

pytestmark = [
    pytest.mark.vm,
    pytest.mark.vm_e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="VM tests need root (namespaces, taps)"),
]
TIMEOUT = 1500  # three TCG machines on two cores
NODES: list[tuple[str, str, str, Firmware]] = [
    ("e2e1", "52:54:00:00:03:11", "10.88.0.81", "bios"),
    ("e2e2", "52:54:00:00:03:12", "10.88.0.82", "bios"),
    ("e2e3", "52:54:00:00:03:13", "10.88.0.83", "uefi"),
]
#: udpcast's rate: under what three TCG guests on two cores unpack (about 12 Mbit/s each),
#: so that none leaves the session for HTTP
CONFIG = 'multicast_max_bitrate = "10m"\nmulticast_max_wait = 120.0\n'


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstallBed]:
    nodes = [(n, mac, ip) for n, mac, ip, _ in NODES]
    with install_bed("e2m", nodes, tmp_path_factory.mktemp("bed"), CONFIG) as bed:
        yield bed


def first_boots(server: Server, node: str) -> int:
    return sum(1 for e in server.event_rows(node) if e[0] == "first-boot")


def wait_first_boot(server: Server, vms: dict[str, VM], node: str, seen: int) -> None:
    """Until the node's installed system reported once more than ``seen`` times."""
    deadline = time.monotonic() + TIMEOUT
    while first_boots(server, node) <= seen:
        status = server.status(node)
        failed = f"{node} failed" in " ".join(status.split())
        if failed or not vms[node].running or time.monotonic() > deadline:
            print(server.log.read_text()[-4000:])
            raise AssertionError(f"{node}: no first boot\n{status}\n{vms[node].console()[-4000:]}")
        time.sleep(3)


def deployment_bytes(server: Server, node: str) -> int:
    with sqlite3.connect(server.home / "corral.db") as db:
        row = db.execute(
            "SELECT bytes FROM deployment_node WHERE node = ? ORDER BY id DESC LIMIT 1", (node,)
        ).fetchone()
    return int(row[0])


def reboot(server: Server, key: Path, ip: str) -> None:
    """``systemctl reboot`` over SSH (the connection drops as it goes down)."""
    argv = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", f"root@{ip}", "systemctl reboot"]  # fmt: skip
    subprocess.run(server.net.exec(argv), capture_output=True, timeout=60, check=False)


def test_three_machines_by_multicast_then_http_and_rsync(bed: InstallBed, tmp_path: Path) -> None:
    server, key = bed.server, bed.key
    deploy = corral(
        "deploy", "e2e[1-3]", "--image", IMAGE, "--transport", "multicast", home=server.home
    )
    assert deploy.returncode == 0, deploy.stderr
    with ExitStack() as stack:
        vms: dict[str, VM] = {}
        for index, (name, mac, _, firmware) in enumerate(NODES):
            vms[name] = stack.enter_context(
                VM(server.net, workdir=tmp_path, name=name, mac=mac, tap=f"tap31{index}",
                   firmware=firmware, memory_mb=1024,
                   disks=[empty_disk(tmp_path / f"{name}.img")], reboot=True)
            )  # fmt: skip
        started = time.monotonic()
        for name, *_ in NODES:
            wait_first_boot(server, vms, name, 0)
            print(f"{name} installed and up {time.monotonic() - started:.0f} s after power-on")
            # one session carried the image: a node may catch up a few chunks by HTTP
            match = re.search(r"in (\d+) chunks, (\d+) by multicast", vms[name].console())
            assert match, vms[name].console()[-3000:]
            assert int(match.group(2)) >= int(match.group(1)) * 2 // 3, match.group(0)
        for name, _, ip, firmware in NODES:
            check_from_outside(server, key, name, ip)
            efi = ssh(server, key, ip, "test -d /sys/firmware/efi && echo uefi || echo bios")
            assert efi.strip() == firmware
        assert ssh(server, key, "10.88.0.83", "ls /boot/efi/EFI/BOOT").split() == ["BOOTX64.EFI"]
        with sqlite3.connect(server.home / "corral.db") as db:
            transports = db.execute("SELECT DISTINCT transport FROM deployment_node").fetchall()
        assert transports == [("multicast",)]

        # e2e1 again, over http: re-armed by the deployment, rebooted by its administrator
        ip = NODES[0][2]
        seen = first_boots(server, "e2e1")
        deploy = corral("deploy", "e2e1", "--image", IMAGE, "--transport", "http", home=server.home)
        assert deploy.returncode == 0, deploy.stderr
        reboot(server, key, ip)
        wait_first_boot(server, vms, "e2e1", seen)
        check_from_outside(server, key, "e2e1", ip)

        # a newer version of the image over rsync: only what changed travels
        changed = corral(
            "image", "exec", IMAGE, "--", "sh", "-c", "echo two > /etc/corral-e2e-version",
            home=server.home,
        )  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        newest = changed.stdout.split()[-1]  # "e2e:1 -> e2e:2"
        try:
            seen = first_boots(server, "e2e1")
            deploy = corral(
                "deploy", "e2e1", "--image", newest, "--transport", "rsync", home=server.home
            )
            assert deploy.returncode == 0, deploy.stderr
            reboot(server, key, ip)
            wait_first_boot(server, vms, "e2e1", seen)
            assert ssh(server, key, ip, "cat /etc/corral-e2e-version").strip() == "two"
            moved = deployment_bytes(server, "e2e1")
            print(f"rsync moved {moved} bytes for the new version")
            assert moved < 20 << 20
            check_from_outside(server, key, "e2e1", ip)
        finally:  # the cached image store keeps only the image built once
            corral("image", "rm", newest, home=server.home)
