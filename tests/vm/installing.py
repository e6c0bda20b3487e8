"""What the install tests share: the corral-built image (built once, cached), SSH into an
installed node from the boot network, and waiting for a node's state."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corral.deploy.keys import host_keys
from corral.images.ramdisk import build_ramdisk
from corral.images.store import flocked
from corral.testbed.qemu import VM
from corral.testbed.vmassets import default_cache_dir
from tests.conftest import corral
from tests.vm.serving import Server, corral_server

IMAGE_HOME = default_cache_dir() / "e2e"
IMAGE = "e2e"


def built_image() -> Path:
    """The images directory holding a bootable Debian 12 image ``e2e`` built by corral
    (once: a test that needs it while another builds it waits for that build)."""
    with flocked(IMAGE_HOME / "build.lock"):
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


def ssh(server: Server, key: Path, ip: str, command: str) -> str:
    argv = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            f"root@{ip}", command]  # fmt: skip
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


def check_from_outside(server: Server, key: Path, node: str, ip: str) -> None:
    """What an administrator checks on a node corral installed: SSH with the profile's
    key, the host key corral keeps, the hostname, fstab's root and the disk's layout."""
    assert ssh(server, key, ip, "hostname").strip() == node
    keyscan = subprocess.run(
        server.net.exec(["ssh-keyscan", "-t", "ed25519", ip]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    kept = host_keys(server.home, node)["ssh_host_ed25519_key.pub"].split()[:2]
    assert kept[1] in keyscan.stdout, keyscan.stdout
    root_uuid = ssh(server, key, ip, "findmnt -n -o UUID /").strip()
    fstab = ssh(server, key, ip, "cat /etc/fstab")
    assert re.search(rf"^UUID={root_uuid}\s+/\s", fstab, re.MULTILINE), fstab
    layout = ssh(server, key, ip, "lsblk -n -r -o NAME,PARTLABEL,FSTYPE /dev/vda")
    parts = [line.split(" ") for line in layout.splitlines()[1:]]
    assert [(p[1], p[2] if len(p) > 2 else "") for p in parts] == [
        ("biosboot", ""),
        ("EFI", "vfat"),
        ("root", "ext4"),
    ], layout
    cmdline = ssh(server, key, ip, "cat /proc/cmdline")
    assert "console=ttyS0" in cmdline and "corral" not in cmdline, cmdline
    first_boot = [e for e in server.event_rows(node) if e[0] == "first-boot"]
    assert first_boot and first_boot[-1][2] == ip, first_boot
    assert f"{node} runs its installed system" in first_boot[-1][1]


def empty_disk(path: Path, size: int = 3 << 30) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def admin_key(directory: Path) -> Path:
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@e2e", "-f", str(key)],
        check=True,
    )
    return key


def profile_cluster(public_key: str, nodes: list[tuple[str, str, str]]) -> str:
    """A profile ``e2e`` installing the image, and image nodes (name, MAC, IP)."""
    lines = [
        "profiles:",
        "  - name: e2e",
        f"    image: {IMAGE}",
        "    kernel_args: [console=ttyS0]",
        "    variables:",
        f'      ssh_authorized_keys: ["{public_key}"]',
        "      installed_kernel_args: [console=ttyS0]",
        "nodes:",
    ]
    for name, mac, ip in nodes:
        lines.append(
            f"  - {{name: {name}, install_method: image, profiles: [e2e], "
            f'interfaces: [{{name: eth0, mac: "{mac}", ip: {ip}, netmask: "24"}}]}}'
        )
    return "\n".join(lines) + "\n"


@dataclass
class InstallBed:
    """A corral serve for install tests, with the image built once and the ramdisk, and
    the administrator's SSH key that the profile authorizes."""

    server: Server
    key: Path


@contextmanager
def install_bed(
    name: str,
    nodes: list[tuple[str, str, str]],
    work: Path,
    config: str = "",
    cluster: Callable[[str], str] | None = None,
) -> Iterator[InstallBed]:
    """``cluster``: the cluster file for the administrator's public key, instead of
    :func:`profile_cluster` of ``nodes``.

    The ramdisk is built in a thread while this one builds the image, each under its own
    lock: on a fresh machine the first two install tests (two workers) otherwise built
    them one after the other while the second worker waited, a core idle (their setup
    125 s, 95-100 s side by side)."""
    with ThreadPoolExecutor(1) as pool:
        cache = default_cache_dir() / "ramdisk"
        building = pool.submit(build_ramdisk, work / "ramdisk", cache=cache)
        images = built_image()
        ramdisk = building.result()
    (work / "ssh").mkdir()
    key = admin_key(work / "ssh")
    public = key.with_suffix(".pub").read_text().strip()
    text = cluster(public) if cluster else profile_cluster(public, nodes)
    with corral_server(
        name, text, ramdisk.kernel, ramdisk.initrd, images=images, config=config
    ) as server:
        yield InstallBed(server, key)
