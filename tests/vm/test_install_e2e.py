"""The whole path, as an administrator judges it: an empty machine is powered on and comes
back as a running, reachable node of the cluster.

A qemu VM (SeaBIOS, TCG) with an empty virtual disk PXE-boots through `corral serve` (DHCP,
TFTP, HTTP), gets the deploy ramdisk from the iPXE script corral renders, and its agent
installs the corral-built Debian 12 image that `corral deploy` armed it with. The agent
reboots; netboot-once hands the VM to its disk, where corral's GRUB boots the image's
kernel; systemd reaches multi-user and corral's first-boot unit reports with the node's
token from its address. Only then is the node `installed`. The test then checks from
outside: SSH with the profile's key, the host key corral keeps, the hostname, the root file
system's UUID in fstab and the partition layout.

The image is built once (``$CORRAL_TESTBED_CACHE/e2e``, about 1.5 min with a warm apt
cache) and reused; the ramdisk is built once too (see test_ramdisk.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.deploy.keys import host_keys
from corral.images.ramdisk import RamdiskResult, build_ramdisk
from corral.testbed.qemu import VM
from corral.testbed.vmassets import default_cache_dir
from tests.conftest import corral
from tests.vm.serving import Server, corral_server

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="VM tests need root (namespaces, taps)"),
]
#: PXE + ramdisk + install + reboot + the image's first boot, under TCG
INSTALL_TIMEOUT = 900
IMAGE_HOME = default_cache_dir() / "e2e"
IMAGE = "e2e"
MAC = "52:54:00:00:03:01"
IP = "10.88.0.71"
DISK_BYTES = 3 << 30


def cluster(public_key: str) -> str:
    return f"""
profiles:
  - name: e2e
    image: {IMAGE}
    kernel_args: [console=ttyS0]
    variables:
      ssh_authorized_keys: ["{public_key}"]
      installed_kernel_args: [console=ttyS0]
nodes:
  - {{name: e2e1, install_method: image, profiles: [e2e],
     interfaces: [{{name: eth0, mac: "{MAC}", ip: {IP}, netmask: "24"}}]}}
"""


def built_image() -> Path:
    """The images directory holding a bootable Debian 12 image ``e2e`` built by corral."""
    if corral("image", "show", IMAGE, home=IMAGE_HOME).returncode != 0:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "corral", "image", "build", IMAGE, "--distro", "debian-12",
             "--no-exports"],
            env=dict(os.environ, CORRAL_HOME=str(IMAGE_HOME)),
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"image {IMAGE} built in {time.monotonic() - started:.0f} s")
    return IMAGE_HOME / "images"


@pytest.fixture(scope="module")
def ramdisk(tmp_path_factory: pytest.TempPathFactory) -> RamdiskResult:
    return build_ramdisk(tmp_path_factory.mktemp("ramdisk"), cache=default_cache_dir() / "ramdisk")


@pytest.fixture(scope="module")
def admin_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@e2e", "-f", str(key)],
        check=True,
    )
    return key


@pytest.fixture(scope="module")
def server(ramdisk: RamdiskResult, admin_key: Path) -> Iterator[Server]:
    images = built_image()
    public = admin_key.with_suffix(".pub").read_text().strip()
    with corral_server(
        "e2e", cluster(public), ramdisk.kernel, ramdisk.initrd, images=images
    ) as server:
        yield server


def ssh(server: Server, key: Path, command: str) -> str:
    argv = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            f"root@{IP}", command]  # fmt: skip
    result = subprocess.run(
        server.net.exec(argv), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"ssh {command}: {result.stderr}"
    return result.stdout


def wait_state(server: Server, vm: VM, node: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = server.status(node)
        if re.search(rf"^{node}\s+{state}\s", text, re.MULTILINE):
            return
        if re.search(rf"^{node}\s+failed\s", text, re.MULTILINE) or not vm.running:
            raise AssertionError(f"{node} did not become {state}:\n{text}\n{vm.console()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{node} not {state} after {timeout:.0f} s:\n{text}\n"
                                 + vm.console()[-4000:])  # fmt: skip
        time.sleep(2)


def test_an_empty_machine_comes_back_installed_and_reachable(
    server: Server, admin_key: Path, tmp_path: Path
) -> None:
    deploy = corral("deploy", "e2e1", "--image", IMAGE, "--transport", "http", home=server.home)
    assert deploy.returncode == 0, deploy.stderr
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(DISK_BYTES)
    with VM(
        server.net, workdir=tmp_path, mac=MAC, tap="tap301", memory_mb=1024, disks=[disk],
        reboot=True,
    ) as vm:  # fmt: skip
        try:
            vm.wait_for(r"reported booted", timeout=300)
            booted = vm.elapsed
            wait_state(server, vm, "e2e1", "deployed", INSTALL_TIMEOUT)
            installed = vm.elapsed
            # the reboot: iPXE exits (not armed), SeaBIOS boots the disk, GRUB the kernel
            wait_state(server, vm, "e2e1", "installed", INSTALL_TIMEOUT)
            up = vm.elapsed
        except Exception:
            print(server.log.read_text()[-4000:])
            raise
        print(
            f"ramdisk up {booted:.0f} s, image on disk {installed:.0f} s, installed system "
            f"reported {up:.0f} s after power-on (TCG)"
        )
        console = vm.console()
        assert "boots from its local disk" in console  # the second network boot
        first_boot = [e for e in server.event_rows("e2e1") if e[0] == "first-boot"]
        assert len(first_boot) == 1 and first_boot[0][2] == IP, first_boot
        assert "e2e1 runs its installed system" in first_boot[0][1]

        # From outside, as an administrator checks a node.
        assert ssh(server, admin_key, "hostname").strip() == "e2e1"
        keyscan = subprocess.run(
            server.net.exec(["ssh-keyscan", "-t", "ed25519", IP]),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        kept = host_keys(server.home, "e2e1")["ssh_host_ed25519_key.pub"].split()[:2]
        assert kept[1] in keyscan.stdout, keyscan.stdout
        root_uuid = ssh(server, admin_key, "findmnt -n -o UUID /").strip()
        fstab = ssh(server, admin_key, "cat /etc/fstab")
        assert re.search(rf"^UUID={root_uuid}\s+/\s", fstab, re.MULTILINE), fstab
        layout = ssh(server, admin_key, "lsblk -n -r -o NAME,PARTLABEL,FSTYPE /dev/vda")
        parts = [line.split(" ") for line in layout.splitlines()[1:]]
        assert [(p[1], p[2] if len(p) > 2 else "") for p in parts] == [
            ("biosboot", ""),
            ("EFI", "vfat"),
            ("root", "ext4"),
        ], layout
        cmdline = ssh(server, admin_key, "cat /proc/cmdline")
        assert "console=ttyS0" in cmdline and "corral" not in cmdline, cmdline
        print("ssh e2e1:", shlex.join(["lsblk", *layout.split()]))
