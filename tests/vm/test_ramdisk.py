"""The deploy ramdisk for real: built from Debian packages, PXE-booted by a qemu VM
through `corral serve`, its agent reports `booted` for the node from the node's address.

The build is cached (``$CORRAL_TESTBED_CACHE/ramdisk``): only the first run pays for it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.images.ramdisk import RamdiskResult, build_ramdisk
from corral.images.ramdisk.contents import BOOT_MODULES, DIST_PACKAGES_DIR, REQUIRED_TOOLS
from corral.testbed.qemu import VM
from corral.testbed.vmassets import default_cache_dir
from tests.conftest import corral
from tests.vm.serving import Server, corral_server

pytestmark = [
    pytest.mark.vm,
    pytest.mark.minutes(2),
    pytest.mark.skipif(os.geteuid() != 0, reason="VM tests need root (namespaces, taps)"),
]
BOOT_TIMEOUT = 300
MAX_RAMDISK = 60 * 1000 * 1000  # kernel and initrd, what each node fetches

MAC = "52:54:00:00:02:01"
IP = "10.88.0.61"
#: A node whose ramdisk runs the ramdisk's Python as init (in place of /init and the
#: agent): the kernel passes NAME=value words as its environment and the words after
#: "--" as its arguments. It prints libtorrent's version and exits; panic=-1 ends the VM
#: then. No /dev/urandom before devtmpfs is mounted: a fixed hash seed spares Python
#: asking for random bytes at start-up.
LT_MAC = "52:54:00:00:02:02"
LT_IP = "10.88.0.62"
LT_CODE = "print('corral-libtorrent',__import__('libtorrent').__version__)"  # no spaces
CLUSTER = f"""
profiles:
  - {{name: agent, kernel_args: [console=ttyS0, corral.agent_exit=poweroff]}}
  - name: python-init
    kernel_args: [console=ttyS0, panic=-1, rdinit=/usr/bin/python3,
                  PYTHONPATH=/{DIST_PACKAGES_DIR},
                  PYTHONHASHSEED=0, "--", -S, -c, "{LT_CODE}"]
nodes:
  - {{name: agent1, install_method: image, profiles: [agent],
     interfaces: [{{mac: "{MAC}", ip: {IP}}}]}}
  - {{name: lt1, install_method: image, profiles: [python-init],
     interfaces: [{{mac: "{LT_MAC}", ip: {LT_IP}}}]}}
"""


@pytest.fixture(scope="module")
def ramdisk(tmp_path_factory: pytest.TempPathFactory) -> RamdiskResult:
    dest = tmp_path_factory.mktemp("ramdisk")
    result = build_ramdisk(dest, cache=default_cache_dir() / "ramdisk")
    print(
        f"ramdisk: initrd {result.initrd_size / 1e6:.1f} MB "
        f"({result.initrd_unpacked_size / 1e6:.1f} MB unpacked), kernel "
        f"{result.kernel_size / 1e6:.1f} MB, built in {result.build_seconds:.0f} s"
        + (" (cached)" if result.cached else "")
    )
    return result


@pytest.fixture(scope="module")
def server(ramdisk: RamdiskResult) -> Iterator[Server]:
    with corral_server("rd", CLUSTER, ramdisk.kernel, ramdisk.initrd) as server:
        yield server


def _listing(initrd: Path, tmp: Path) -> set[str]:
    cpio = tmp / "initrd.cpio"
    subprocess.run(["zstd", "-q", "-d", "-f", str(initrd), "-o", str(cpio)], check=True)
    out = subprocess.run(
        ["cpio", "-t", "--quiet", "-F", str(cpio)], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def ramdisk_builtin(ramdisk: RamdiskResult, tmp: Path) -> set[str]:
    """Modules built into the ramdisk's kernel (its modules.builtin, from the initrd)."""
    out = tmp / "builtin"
    out.mkdir(exist_ok=True)
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "-F", str(tmp / "initrd.cpio"), "*/modules.builtin"],
        cwd=out,
        check=True,
    )
    names = set()
    for path in out.rglob("modules.builtin"):
        names |= {os.path.basename(line).removesuffix(".ko") for line in path.read_text().split()}
    return names


def test_initramfs_has_the_tools_and_fits(ramdisk: RamdiskResult, tmp_path: Path) -> None:
    total = ramdisk.initrd_size + ramdisk.kernel_size
    assert total <= MAX_RAMDISK, f"kernel + initrd are {total / 1e6:.1f} MB"
    names = _listing(ramdisk.initrd, tmp_path)
    missing = [tool for tool in REQUIRED_TOOLS if tool not in names]
    assert not missing, missing
    assert "usr/lib/corral-agent/corral/agent/main.py" in names
    assert "dev/console" in names
    # kmod's modprobe (modalias loading of NIC drivers) needs depmod's binary index.
    assert f"usr/lib/modules/{ramdisk.kernel_version}/modules.dep.bin" in names
    modules = {os.path.basename(n).removesuffix(".ko") for n in names if n.endswith(".ko")}
    for wanted in ("virtio_net", "virtio_blk", "virtio_scsi", "xfs"):
        assert wanted in modules and wanted in BOOT_MODULES
    # physical servers' NICs and storage controllers, loaded by modalias; crc32c, which
    # ext4 and xfs load through the crypto API (a soft dependency)
    real = "e1000e igb ixgbe i40e ice mlx5_core bnxt_en tg3 ahci nvme megaraid_sas mpt3sas"
    for wanted in [*real.split(), "crc32c_generic"]:
        assert wanted in modules or wanted in ramdisk_builtin(ramdisk, tmp_path), wanted
    # Pruned: documentation, locales, the Python test suite, apt/dpkg state.
    for prefix in ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "var/lib/dpkg/"):
        assert not [n for n in names if n.startswith(prefix)], prefix
    assert not [n for n in names if n.startswith("usr/lib/python3.11/test/")]
    assert not [n for n in names if "/perl" in n]
    # Debian's libtorrent binding for the BitTorrent receiver, without the rest of
    # dist-packages (the build already failed if a library it links were missing).
    python3 = [n for n in names if n.startswith("usr/lib/python3/")]
    assert [os.path.basename(n) for n in python3 if n.endswith(".so")] == [
        "libtorrent.cpython-311-x86_64-linux-gnu.so"
    ], python3
    assert f"{DIST_PACKAGES_DIR}/libtorrent.egg-info/PKG-INFO" not in names
    libs = {os.path.basename(n) for n in names if n.startswith("usr/lib/x86_64-linux-gnu/")}
    assert {"libtorrent-rasterbar.so.2.0", "libboost_python311.so.1.74.0"} <= libs, libs


def test_agent_reports_booted_from_the_reserved_address(
    server: Server, ramdisk: RamdiskResult, tmp_path: Path
) -> None:
    """... and, booted for an install with no deployment to run, says so on its status
    rather than wait in silence."""
    with VM(server.net, workdir=tmp_path, mac=MAC, tap="tap201", memory_mb=1024) as vm:
        try:
            vm.wait_for(r"reported booted", timeout=BOOT_TIMEOUT)
            seconds = vm.elapsed
            vm.wait_for(r"no install plan yet", timeout=60)
        except Exception:
            print(server.log.read_text()[-3000:])
            raise
    print(f"booted event {seconds:.1f} s after qemu started (TCG)")
    events = server.event_rows("agent1")
    booted = [e for e in events if e[0] == "booted"]
    assert booted, events
    _, message, source = booted[-1]
    assert source == IP
    assert message.startswith(f"ip={IP} mac={MAC} kernel={ramdisk.kernel_version} cpus=1 ")
    status = corral("node", "status", "agent1", home=server.home)
    assert status.returncode == 0 and "installing" in status.stdout
    assert "waiting" in status.stdout, status.stdout
    phase, message, source = server.event_rows("agent1")[-1]
    assert (phase, source) == ("waiting", IP)
    assert "no deployment includes it" in message


def test_ramdisk_python_imports_libtorrent(server: Server, tmp_path: Path) -> None:
    """The BitTorrent receiver's engine loads in the booted ramdisk: Debian's libtorrent
    binding, every library it links and the standard-library modules it imports."""
    with VM(server.net, workdir=tmp_path, mac=LT_MAC, tap="tap202", memory_mb=1024) as vm:
        match = vm.wait_for(r"^corral-libtorrent (\d\S*)", timeout=BOOT_TIMEOUT)
        vm.wait_exit(timeout=60)  # init exited, the kernel panicked, panic=-1 rebooted
    print(f"libtorrent {match.group(1)} in the ramdisk")
    assert match.group(1).startswith("2.")


def test_unknown_machine_is_discovered_with_its_hardware(server: Server, tmp_path: Path) -> None:
    """No node has this MAC: corral hands out the same ramdisk with corral.discover=1 and
    the agent registers the machine, disk and NIC included; then it waits for work."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    mac = "52:54:00:00:02:99"
    with VM(
        server.net, workdir=tmp_path, mac=mac, tap="tap299", memory_mb=1024, disks=[disk]
    ) as vm:
        try:
            match = vm.wait_for(r"discovered as node (\S+)", timeout=BOOT_TIMEOUT)
        except Exception:
            print(server.log.read_text()[-3000:])
            raise
        vm.wait_for(r"waiting for instructions", timeout=30)
    name = match.group(1)
    assert name == "d525400000299"
    facts = server.facts(name)
    assert facts["mac"] == mac and facts["cpus"] == 1
    assert [(d["name"], d["size_bytes"]) for d in facts["disks"]] == [("vda", 64 * 1024 * 1024)]
    assert [(n["mac"], n["driver"]) for n in facts["nics"]] == [(mac, "virtio_net")]


def test_a_server_with_an_intel_nic_and_an_nvme_disk_is_discovered(
    server: Server, ramdisk: RamdiskResult, tmp_path: Path
) -> None:
    """Real servers' hardware: an e1000e NIC and an NVMe disk, whose drivers the ramdisk's
    generic kernel carries as modules that /init loads by the devices' modalias."""
    disk = tmp_path / "nvme.img"
    with disk.open("wb") as f:
        f.truncate(128 * 1024 * 1024)
    mac = "52:54:00:00:02:98"
    with VM(
        server.net, workdir=tmp_path, mac=mac, tap="tap298", memory_mb=1024, disks=[disk],
        nic="e1000e", disk_bus="nvme",
    ) as vm:  # fmt: skip
        try:
            match = vm.wait_for(r"discovered as node (\S+)", timeout=BOOT_TIMEOUT)
        except Exception:
            print(server.log.read_text()[-3000:])
            raise
    facts = server.facts(match.group(1))
    assert [(n["mac"], n["driver"]) for n in facts["nics"]] == [(mac, "e1000e")]
    assert [(d["name"], d["size_bytes"]) for d in facts["disks"]] == [
        ("nvme0n1", 128 * 1024 * 1024)
    ]
    print(
        f"ramdisk for real servers: kernel {ramdisk.kernel_size / 1e6:.1f} MB + initrd "
        f"{ramdisk.initrd_size / 1e6:.1f} MB = "
        f"{(ramdisk.kernel_size + ramdisk.initrd_size) / 1e6:.1f} MB"
    )
