"""Real firmware against `corral serve`: qemu VMs PXE-boot through corral's own DHCP
(dnsmasq), TFTP and HTTP, into a test kernel and initramfs that report back.

One server runs for the module, in a network namespace with a bridge; each test boots
a VM on a tap of that bridge and checks what corral recorded for the node.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testbed.qemu import VM
from corral.testbed.vmassets import build_test_boot_assets, default_cache_dir
from tests.conftest import corral
from tests.vm.serving import Server, corral_server

pytestmark = [
    pytest.mark.vm,
    pytest.mark.minutes(1.5),
    pytest.mark.skipif(os.geteuid() != 0, reason="VM tests need root (namespaces, taps)"),
]
BOOT_TIMEOUT = 240

CLUSTER = """
profiles:
  - {name: console, kernel_args: [console=ttyS0]}
  - {name: finish, kernel_args: [corral.phase=install-finished]}
nodes:
  - {name: bios1, install_method: image, profiles: [console],
     interfaces: [{mac: "52:54:00:00:01:01", ip: 10.88.0.51}]}
  - {name: uefi1, install_method: image, profiles: [console],
     interfaces: [{mac: "52:54:00:00:01:02", ip: 10.88.0.52}]}
  - {name: efipxe1, install_method: image, profiles: [console],
     interfaces: [{mac: "52:54:00:00:01:03", ip: 10.88.0.53}]}
  - {name: pxl1, install_method: image, profiles: [console], boot_loader: pxelinux,
     interfaces: [{mac: "52:54:00:00:01:04", ip: 10.88.0.54}]}
  - {name: once1, install_method: image, profiles: [console, finish],
     interfaces: [{mac: "52:54:00:00:01:05", ip: 10.88.0.55}]}
  - {name: grub1, install_method: image, profiles: [console], boot_loader: grub,
     interfaces: [{mac: "52:54:00:00:01:06", ip: 10.88.0.56}]}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    assets = build_test_boot_assets(tmp_path_factory.mktemp("assets"), default_cache_dir())
    with corral_server("srv", CLUSTER, assets.kernel, assets.initrd) as server:
        yield server


def boot(server: Server, tmp_path: Path, mac: str, pattern: str, **vm: object) -> str:
    tap = f"tap{mac[-2:]}"
    with VM(server.net, workdir=tmp_path, mac=mac, tap=tap, **vm) as machine:  # type: ignore[arg-type]
        try:
            match = machine.wait_for(pattern, timeout=BOOT_TIMEOUT)
        except Exception:
            print(server.log.read_text()[-3000:])
            raise
        return match.group(0)


def test_bios_ipxe_boot_reports_for_the_right_node(server: Server, tmp_path: Path) -> None:
    marker = boot(server, tmp_path, "52:54:00:00:01:01", r"CORRAL-TEST-BOOTED node=\S+ ip=\S+")
    assert marker == "CORRAL-TEST-BOOTED node=bios1 ip=10.88.0.51"
    events = server.events("bios1")
    # The token reached the ramdisk as a second initrd: the authenticated event landed,
    # sent from the node's reserved address.
    assert "booted|ip=10.88.0.51 mac=52:54:00:00:01:01|10.88.0.51" in events
    assert "installing" in server.status("bios1")


def test_uefi_ipxe_boot(server: Server, tmp_path: Path) -> None:
    marker = boot(
        server,
        tmp_path,
        "52:54:00:00:01:02",
        r"CORRAL-TEST-BOOTED node=\S+ ip=\S+",
        firmware="uefi",
    )
    assert marker == "CORRAL-TEST-BOOTED node=uefi1 ip=10.88.0.52"
    assert "booted|ip=10.88.0.52" in server.events("uefi1")


def test_uefi_firmware_pxe_loads_ipxe_over_tftp(server: Server, tmp_path: Path) -> None:
    """No iPXE ROM: OVMF's own PXE asks DHCP (arch 7), gets ipxe.efi over corral's TFTP,
    which asks DHCP again and gets its script over HTTP."""
    marker = boot(
        server,
        tmp_path,
        "52:54:00:00:01:03",
        r"CORRAL-TEST-BOOTED node=\S+ ip=\S+",
        firmware="uefi",
        option_rom=False,
    )
    assert marker == "CORRAL-TEST-BOOTED node=efipxe1 ip=10.88.0.53"
    assert "ipxe.efi" in server.log.read_text()
    # every step corral served is on the node, in order, up to the ramdisk's own report
    rows = server.event_rows("efipxe1")
    phases = [phase for phase, _, _ in rows]
    assert "booted" in phases, rows
    upto = phases[: phases.index("booted") + 1]
    steps = [p for i, p in enumerate(upto) if i == 0 or p != upto[i - 1]]
    assert steps == ["dhcp", "loader", "dhcp", "boot-config", "kernel", "initrd", "booted"], rows
    messages = [message for _, message, _ in rows]
    assert "10.88.0.53 acknowledged (ipxe.efi)" in messages, rows
    assert any(m.startswith("ipxe.efi over TFTP (") for m in messages), rows
    assert "token over HTTP" in messages, rows


def test_pxelinux_boot_over_tftp(server: Server, tmp_path: Path) -> None:
    marker = boot(server, tmp_path, "52:54:00:00:01:04", r"CORRAL-TEST-BOOTED node=\S+ ip=\S+")
    assert marker == "CORRAL-TEST-BOOTED node=pxl1 ip=10.88.0.54"
    log = server.log.read_text()
    assert "pxelinux.cfg/01-52-54-00-00-01-04" in log
    assert "booted|ip=10.88.0.54" in server.events("pxl1")


def test_grub_network_boot_over_tftp(server: Server, tmp_path: Path) -> None:
    """UEFI firmware PXE -> grubnetx64.efi over TFTP -> its grub.cfg-01-<mac> -> kernel."""
    marker = boot(
        server,
        tmp_path,
        "52:54:00:00:01:06",
        r"CORRAL-TEST-BOOTED node=\S+ ip=\S+",
        firmware="uefi",
        option_rom=False,
    )
    assert marker == "CORRAL-TEST-BOOTED node=grub1 ip=10.88.0.56"
    assert "grub/grub.cfg-01-52:54:00:00:01:06" in server.log.read_text()
    assert "booted|ip=10.88.0.56" in server.events("grub1")


def test_unknown_machine_is_discovered(server: Server, tmp_path: Path) -> None:
    marker = boot(server, tmp_path, "52:54:00:00:01:99", r"CORRAL-TEST-DISCOVERED mac=\S+")
    assert marker == "CORRAL-TEST-DISCOVERED mac=52:54:00:00:01:99"
    status = server.status("d525400000199")
    assert "discovered" in status
    shown = corral("node", "show", "d525400000199", home=server.home)
    assert "52:54:00:00:01:99" in shown.stdout


def test_finished_node_boots_from_disk_until_reinstalled(server: Server, tmp_path: Path) -> None:
    marker = boot(server, tmp_path / "1", "52:54:00:00:01:05", r"CORRAL-TEST-BOOTED node=\S+")
    assert marker == "CORRAL-TEST-BOOTED node=once1"
    assert "installed" in server.status("once1")
    # The next network boot gets "boot from local disk": no reinstall loop.
    script = subprocess.run(
        server.net.exec(["curl", "-sf", "http://10.88.0.1:8080/boot/52-54-00-00-01-05.ipxe"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "boots from its local disk" in script
    assert corral("node", "reinstall", "once1", home=server.home).returncode == 0
    assert "armed" in server.status("once1")
