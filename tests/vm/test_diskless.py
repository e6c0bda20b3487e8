"""Diskless nodes, as an administrator judges them: machines without an install boot the
corral-built Debian 12 image from RAM, as themselves, and forget what they wrote.

Two qemu VMs (TCG) PXE-boot through `corral serve`: ``dl1`` by SeaBIOS with no disk at all,
``dl2`` by OVMF (UEFI) with an empty disk and ``/var/log`` declared persistent. Each gets
the image's own kernel and corral's diskless initramfs, whose agent fetches the image's
squashfs into RAM, mounts it under a tmpfs overlay, writes the node's identity and
switch_root's into the image's systemd, which reports ``running`` with the node's token.
The first boot is `corral boot`'s; the second, dl2's after a reboot from inside, is the
node's own. (Only dl2 reboots: its disk is where a second boot could differ, and a second
VM under TCG costs the suite a minute. Nodes rebooting on their own are gathered into one
session in tests/integration/test_diskless_testbed.py.)

Checked from outside: the ``running`` event came from the node's reserved address; SSH
with the profile's key; the hostname; ``ssh-keyscan`` gives the host key corral keeps;
after dl2's reboot a file written to /root is gone, the identity is the same, and its
/var/log kept what was written there (on the partition labelled corral-state that its
first boot made on the empty disk); and its shutdown left what the ramdisk mounted to
systemd's last pass, with no "Failed unmounting" on the console.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from corral.deploy.keys import host_keys
from corral.testbed.qemu import VM
from tests.conftest import corral
from tests.vm.installing import IMAGE, InstallBed, empty_disk, install_bed, ssh

pytestmark = [
    pytest.mark.vm,
    pytest.mark.minutes(3.5),
    pytest.mark.skipif(os.geteuid() != 0, reason="VM tests need root (namespaces, taps)"),
]
#: PXE, the squashfs into RAM and systemd up to multi-user, under TCG
BOOT_TIMEOUT = 900
NODES = {
    # name: (MAC, IP, firmware, disk)
    "dl1": ("52:54:00:00:04:01", "10.88.0.81", "bios", False),
    "dl2": ("52:54:00:00:04:02", "10.88.0.82", "uefi", True),
}


def cluster(public_key: str) -> str:
    lines = [
        "profiles:",
        "  - name: diskless",
        f"    image: {IMAGE}",
        "    kernel_args: [console=ttyS0]",
        "    variables:",
        f'      ssh_authorized_keys: ["{public_key}"]',
        "nodes:",
    ]
    for name, (mac, ip, _, disk) in NODES.items():
        persistent = ", variables: {persistent_paths: [/var/log]}" if disk else ""
        lines.append(
            f"  - {{name: {name}, install_method: diskless, profiles: [diskless], "
            f'interfaces: [{{name: eth0, mac: "{mac}", ip: {ip}, netmask: "24"}}]{persistent}}}'
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstallBed]:
    work = tmp_path_factory.mktemp("diskless")
    # dl2's second boot is its own, gathered with others for diskless_window (10 s by
    # default): nobody else boots here, so the test waits 1 s
    with install_bed("dl", [], work, config="diskless_window = 1.0\n", cluster=cluster) as bed:
        yield bed


def running_events(bed: InstallBed, node: str) -> list[tuple[str, str, str]]:
    return [e for e in bed.server.event_rows(node) if e[0] == "running"]


def wait_running(bed: InstallBed, vms: dict[str, VM], seen: dict[str, int]) -> dict[str, int]:
    """Until every node has posted one ``running`` more than ``seen``; the seconds each VM
    had run by then."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    waiting, running = set(vms), {}
    while waiting:
        for node in sorted(waiting):
            if len(running_events(bed, node)) > seen[node]:
                waiting.discard(node)
                running[node] = round(vms[node].elapsed)
            elif re.search(rf"^{node}\s+failed\s", bed.server.status(node), re.MULTILINE):
                raise AssertionError(f"{node} failed:\n{bed.server.status(node)}\n"
                                     + vms[node].console()[-4000:])  # fmt: skip
            elif not vms[node].running or time.monotonic() > deadline:
                print(bed.server.log.read_text()[-4000:])
                raise AssertionError(f"{node} not running after {BOOT_TIMEOUT} s:\n"
                                     + vms[node].console()[-4000:])  # fmt: skip
        time.sleep(2)
    return running


def check_identity(bed: InstallBed, node: str) -> None:
    server, ip = bed.server, NODES[node][1]
    event = running_events(bed, node)[-1]
    assert event[2] == ip, event  # from the node's reserved address, with its token
    assert f"{node} runs image {IMAGE}:" in event[1] and "(diskless)" in event[1], event
    assert ssh(server, bed.key, ip, "hostname").strip() == node
    keyscan = subprocess.run(
        server.net.exec(["ssh-keyscan", "-t", "ed25519", ip]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    kept = host_keys(server.home, node)["ssh_host_ed25519_key.pub"].split()[1]
    assert kept in keyscan.stdout, keyscan.stdout
    root = ssh(server, bed.key, ip, "findmnt -n -o FSTYPE /").strip()
    assert root == "overlay", root
    status = bed.server.status(node)
    assert re.search(rf"^{node}\s+running\s", status, re.MULTILINE), status


def test_diskless_nodes_boot_from_ram_as_themselves_and_forget(
    bed: InstallBed, tmp_path: Path
) -> None:
    server = bed.server
    booted = corral("boot", "dl[1-2]", "--no-wait", home=server.home)
    assert booted.returncode == 0, booted.stderr
    with ExitStack() as stack:
        vms: dict[str, VM] = {}
        for i, (node, (mac, _, firmware, disk)) in enumerate(NODES.items()):
            disks = [empty_disk(tmp_path / f"{node}.img", 1 << 30)] if disk else []
            vms[node] = stack.enter_context(
                VM(server.net, workdir=tmp_path, name=node, mac=mac, tap=f"tap40{i}",
                   firmware=firmware, memory_mb=1536, disks=disks, reboot=True)  # type: ignore[arg-type]
            )  # fmt: skip
        seen = dict.fromkeys(NODES, 0)
        first = wait_running(bed, vms, seen)
        for node in NODES:
            check_identity(bed, node)
            ip = NODES[node][1]
            ssh(server, bed.key, ip, "echo scratch > /root/gone-after-reboot")
            ssh(server, bed.key, ip, "echo kept > /var/log/corral-kept")
        dl2 = NODES["dl2"][1]
        where = ssh(server, bed.key, dl2, "findmnt -n -o SOURCE,FSTYPE /var/log").split()
        assert where == ["/dev/vda1[/var/log]", "ext4"], where
        label = ssh(server, bed.key, dl2, "blkid -s LABEL -o value /dev/vda1").strip()
        assert label == "corral-state"
        assert ssh(server, bed.key, NODES["dl1"][1], "ls /dev/vda 2>&1 || true").startswith("ls:")

        vms["dl1"].stop()
        seen = {"dl2": len(running_events(bed, "dl2"))}
        ssh(server, bed.key, dl2, "systemctl reboot || true")
        again = wait_running(bed, {"dl2": vms["dl2"]}, seen)["dl2"]
        # what the ramdisk mounted is left to systemd's last pass, not failed in red
        console = vms["dl2"].console()
        failed = console.find("Failed unmounting")
        assert failed < 0, console[failed - 3000 : failed + 500]
        check_identity(bed, "dl2")
        assert ssh(server, bed.key, dl2, "ls /root").split() == []
        assert ssh(server, bed.key, dl2, "cat /var/log/corral-kept").strip() == "kept"
        print(f"VM seconds to running (TCG): first boot {first}; dl2 after its reboot {again}")
