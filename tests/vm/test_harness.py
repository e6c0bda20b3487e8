"""End-to-end proof of the VM harness: real qemu VMs PXE-boot in a network namespace.

No corral server is involved: dnsmasq (DHCP + TFTP) and a small recording HTTP server run
inside the namespace, and the test initramfs reports to the latter.

Its five boots (BIOS and UEFI iPXE, OVMF's own PXE, pxelinux, discovery) are marked
``vm_harness`` and left out of ``make test``: test_serve_boot.py makes the same five boots
through corral serve, so a broken harness fails there too. ``make vm-harness`` runs them,
to tell a broken harness from a broken corral.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.kmod import load_order
from corral.run import spawn
from corral.testbed.netns import PxeNetwork, cleanup_stale, list_namespaces, run_prefix
from corral.testbed.qemu import IPXE_ROM, ROM_CODE_EFI, ROM_CODE_X86, VM, Firmware, rom_code_types
from corral.testbed.vmassets import (
    DHCP_SCRIPT,
    INIT_SCRIPT,
    BootAssets,
    build_test_boot_assets,
    build_token_initrd,
    decompress_module,
    default_cache_dir,
)

BOOT_TIMEOUT = 180.0  # seconds, per VM, under TCG
HTTP_PORT = 8080
SUBNET = "10.88.0"
ADDRESS6 = "fd00:88::1/64"  # only for router advertisements: they spare iPXE a 13 s wait
IPXE_DIR = Path("/usr/lib/ipxe")
PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
NEEDED_PROGRAMS = ("qemu-system-x86_64", "dnsmasq", "ip", "apt-get", "apt-cache", "dpkg", "cpio")
NEEDED_FILES = (
    IPXE_ROM,
    IPXE_DIR / "undionly.kpxe",
    IPXE_DIR / "ipxe.efi",
    PXELINUX,
    LDLINUX,
    Path("/bin/busybox"),
    Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
)


def _missing() -> list[str]:
    missing = [p for p in NEEDED_PROGRAMS if shutil.which(p) is None]
    missing += [str(f) for f in NEEDED_FILES if not f.exists()]
    return missing


pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="VM tests need root (namespaces, taps)"),
]


def test_vm_tools_are_installed() -> None:
    """make setup installs them: a missing one is a failure, not a reason to skip."""
    assert _missing() == []


PREFIX = run_prefix()

# Runs inside the namespace: serves ROOT, appends every POST to RECORDS as a JSON line.
STUB_SERVER = r"""
import http.server, json, os, sys

root, host, port, records, ready = sys.argv[1:6]

class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=root, **kwargs)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record = {
            "path": self.path,
            "authorization": self.headers.get("Authorization"),
            "content_type": self.headers.get("Content-Type"),
            "body": body.decode("utf-8", "replace"),
            "client": self.client_address[0],
        }
        with open(records, "a") as f:
            f.write(json.dumps(record) + "\n")
        reply = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, fmt, *args):
        sys.stderr.write("http: " + (fmt % args) + "\n")
        sys.stderr.flush()

server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
with open(ready + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
server.serve_forever()
"""


@dataclass
class Bed:
    """A boot network with dnsmasq and the recording HTTP server running in it."""

    net: PxeNetwork
    work: Path
    tftp: Path
    http: Path
    records: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def server_url(self) -> str:
        return f"http://{self.net.gateway}:{HTTP_PORT}"

    def posts(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        return [json.loads(line) for line in self.records.read_text().splitlines() if line]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear:\n{log.read_text()}")
        time.sleep(0.05)


@contextmanager
def pxe_bed(work: Path, name: str, dhcp_boot: list[str], hosts: dict[str, str]) -> Iterator[Bed]:
    """Namespace + dnsmasq (``dhcp_boot`` options, ``hosts`` MAC -> IP) + HTTP server."""
    tftp, http = work / "tftp", work / "http"
    tftp.mkdir()
    http.mkdir()
    with PxeNetwork(PREFIX + name, address=f"{SUBNET}.1/24", address6=ADDRESS6) as net:
        bed = Bed(net, work, tftp, http, work / "posts.jsonl")
        try:
            argv = [
                "dnsmasq",
                "--keep-in-foreground",
                "--no-daemon",
                "--conf-file=/dev/null",
                "--log-dhcp",
                "--port=0",
                "--bind-interfaces",
                f"--interface={net.bridge}",
                f"--dhcp-range={SUBNET}.100,{SUBNET}.200,255.255.255.0,1h",
                f"--dhcp-leasefile={work / 'dnsmasq.leases'}",
                "--enable-tftp",
                f"--tftp-root={tftp}",
                *(f"--dhcp-host={mac},{ip}" for mac, ip in hosts.items()),
                *net.dnsmasq_ra_args(),
                *dhcp_boot,
            ]
            with (work / "dnsmasq.log").open("wb") as out:
                dnsmasq = spawn(net.exec(argv), stdout=out.fileno(), stderr=subprocess.STDOUT)
            bed.procs.append(dnsmasq)
            ready = work / "http.ready"
            server = [sys.executable, "-c", STUB_SERVER, str(http), net.gateway, str(HTTP_PORT)]
            with (work / "http.log").open("wb") as out:
                stub = spawn(
                    net.exec([*server, str(bed.records), str(ready)]),
                    stdout=out.fileno(),
                    stderr=subprocess.STDOUT,
                )
            bed.procs.append(stub)
            _wait_file(ready, stub, work / "http.log", 30)
            time.sleep(0.3)
            assert dnsmasq.poll() is None, (work / "dnsmasq.log").read_text()
            yield bed
        finally:
            for proc in reversed(bed.procs):
                _stop(proc)


def ipxe_dhcp_boot(bed_url: str) -> list[str]:
    """dnsmasq options: iPXE gets the HTTP script; other PXE clients get iPXE over TFTP."""
    return [
        "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-match=set:ipxe,175",
        "--dhcp-match=set:efi64,option:client-arch,7",
        "--dhcp-match=set:efi64,option:client-arch,9",
        f"--dhcp-boot=tag:ipxe,{bed_url}/boot.ipxe",
        "--dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi",
        "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
    ]


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> BootAssets:
    cleanup_stale()
    return build_test_boot_assets(tmp_path_factory.mktemp("assets"), default_cache_dir())


@pytest.fixture(autouse=True)
def _no_leftover_namespace() -> Iterator[None]:
    yield
    leftovers = [n for n in list_namespaces() if n.startswith(PREFIX)]
    assert not leftovers, f"namespaces left behind: {leftovers}"


def _serve_assets(assets: BootAssets, into: Path) -> None:
    shutil.copyfile(assets.kernel, into / "vmlinuz")
    shutil.copyfile(assets.initrd, into / "initrd.gz")


def _ipxe_boot(
    tmp_path: Path, assets: BootAssets, firmware: Firmware, record: Any, *, option_rom: bool = True
) -> None:
    mac, ip, token = "52:54:00:00:00:01", f"{SUBNET}.50", f"tok-{firmware}-0123456789"
    url = f"http://{SUBNET}.1:{HTTP_PORT}"
    with pxe_bed(tmp_path, firmware, ipxe_dhcp_boot(url), {mac: ip}) as bed:
        for rom in ("undionly.kpxe", "ipxe.efi"):
            shutil.copyfile(IPXE_DIR / rom, bed.tftp / rom)
        _serve_assets(assets, bed.http)
        build_token_initrd(bed.http / "token.gz", token)
        # Under EFI, iPXE hands over only the initrds named by initrd= on the kernel line.
        (bed.http / "boot.ipxe").write_text(
            "#!ipxe\n"
            f"kernel {url}/vmlinuz initrd=initrd.gz initrd=token.gz"
            f" corral.server={url} corral.node=vm1 console=ttyS0 quiet\n"
            f"initrd {url}/initrd.gz\n"
            f"initrd {url}/token.gz\n"
            "boot\n"
        )
        vm = VM(bed.net, workdir=tmp_path / "vm", mac=mac, firmware=firmware, option_rom=option_rom)
        with vm:
            m = vm.wait_for(r"CORRAL-TEST-BOOTED node=(\S+) ip=(\S+)", BOOT_TIMEOUT)
            booted = vm.elapsed
            assert vm.wait_exit(30) == 0  # /init powers off; -no-reboot makes qemu exit
            record("boot_seconds", round(booted, 1))
            print(f"\n{firmware} (option ROM: {option_rom}): booted marker after {booted:.1f} s")
            assert m.group(1) == "vm1"
            assert m.group(2) == ip
            assert "CORRAL-TEST-POST ok" in vm.console()
        chained = f"sent {bed.tftp}/ipxe.efi" in (bed.work / "dnsmasq.log").read_text()
        assert chained == (not option_rom)
        posts = bed.posts()
        assert len(posts) == 1, posts
        post = posts[0]
        assert post["path"] == "/api/v1/nodes/vm1/events"
        assert post["authorization"] == f"Bearer {token}"
        assert post["content_type"] == "application/json"
        assert post["client"] == ip
        assert json.loads(post["body"]) == {"phase": "booted", "message": f"ip={ip} mac={mac}"}


def test_scripts_parse_with_busybox_sh(tmp_path: Path) -> None:
    for name, text in (("init", INIT_SCRIPT), ("dhcp.sh", DHCP_SCRIPT)):
        (tmp_path / name).write_text(text)
        subprocess.run(["/bin/busybox", "sh", "-n", str(tmp_path / name)], check=True)


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    table: dict[str, tuple[Path, list[str]]] = {
        "virtio_net": (tmp_path, ["virtio", "virtio_ring", "net_failover", "failover"]),
        "net_failover": (tmp_path, ["failover"]),
        "failover": (tmp_path, []),
        "virtio": (tmp_path, ["virtio_ring"]),
        "virtio_ring": (tmp_path, []),
    }
    order = load_order(table, ["virtio_net", "virtio_blk"], builtin={"virtio_blk"})
    assert order == ["failover", "net_failover", "virtio_ring", "virtio", "virtio_net"]


def test_compressed_modules_are_unpacked(tmp_path: Path) -> None:
    elf = b"\x7fELF" + bytes(100)
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(elf))
    for name in ("a.ko.xz", "b.ko.gz"):
        plain = decompress_module(tmp_path / name)
        assert plain.suffix == ".ko" and plain.read_bytes() == elf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ko", "b.ko"]


def test_token_initrd_is_a_newc_archive(tmp_path: Path) -> None:
    archive = gzip.decompress(build_token_initrd(tmp_path / "t.gz", "s3cret").read_bytes())
    listing = subprocess.run(["cpio", "-it"], input=archive, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["etc", "etc/corral", "etc/corral/node-token"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id"], input=archive, cwd=out, capture_output=True, check=True)
    assert (out / "etc/corral/node-token").read_text() == "s3cret\n"


def test_option_rom_has_bios_and_efi_images() -> None:
    assert rom_code_types(IPXE_ROM) == [ROM_CODE_X86, ROM_CODE_EFI]


def test_network_is_removed_after_failure(tmp_path: Path) -> None:
    name = PREFIX + "fail"
    with pytest.raises(RuntimeError), PxeNetwork(name) as net:
        net.add_tap("tap0")
        assert "tap0" in net.ip("link", "show")
        raise RuntimeError("boom")
    assert name not in list_namespaces()


def test_cleanup_stale_removes_namespaces_of_dead_runs() -> None:
    gone = spawn(["true"], stderr=subprocess.DEVNULL)  # a pid that has just ended
    gone.wait()
    stale = f"cvt{gone.pid}-stale"
    with PxeNetwork(PREFIX + "live"):
        net = PxeNetwork(stale)
        net.create()
        orphan = spawn(net.exec(["sleep", "300"]), stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.2)
            removed = cleanup_stale()
            assert stale in removed
            assert orphan.wait(timeout=10) != 0  # killed, not finished
            assert stale not in list_namespaces()
            assert PREFIX + "live" in list_namespaces()  # this run is alive: kept
        finally:
            _stop(orphan)
            net.close()


@pytest.mark.vm_harness
def test_bios_ipxe_boot(tmp_path: Path, assets: BootAssets, record_property: Any) -> None:
    _ipxe_boot(tmp_path, assets, "bios", record_property)


@pytest.mark.vm_harness
def test_uefi_ipxe_boot(tmp_path: Path, assets: BootAssets, record_property: Any) -> None:
    _ipxe_boot(tmp_path, assets, "uefi", record_property)


@pytest.mark.vm_harness
def test_uefi_native_pxe_chains_ipxe_efi(
    tmp_path: Path, assets: BootAssets, record_property: Any
) -> None:
    """No NIC ROM: OVMF's own PXE client fetches ipxe.efi over TFTP, which then boots."""
    _ipxe_boot(tmp_path, assets, "uefi", record_property, option_rom=False)


@pytest.mark.vm_harness
def test_pxelinux_tftp_boot(tmp_path: Path, assets: BootAssets, record_property: Any) -> None:
    mac, ip = "52:54:00:00:00:03", f"{SUBNET}.52"
    url = f"http://{SUBNET}.1:{HTTP_PORT}"
    with pxe_bed(tmp_path, "pxelinux", ["--dhcp-boot=pxelinux.0"], {mac: ip}) as bed:
        shutil.copyfile(PXELINUX, bed.tftp / "pxelinux.0")
        shutil.copyfile(LDLINUX, bed.tftp / "ldlinux.c32")
        _serve_assets(assets, bed.tftp)
        cfg = bed.tftp / "pxelinux.cfg"
        cfg.mkdir()
        (cfg / ("01-" + mac.replace(":", "-"))).write_text(
            "DEFAULT corral\nPROMPT 0\nTIMEOUT 0\n"
            "LABEL corral\n"
            "  KERNEL vmlinuz\n"
            "  INITRD initrd.gz\n"
            f"  APPEND corral.server={url} corral.node=vm3 console=ttyS0 quiet\n"
        )
        with VM(bed.net, workdir=tmp_path / "vm", mac=mac) as vm:
            m = vm.wait_for(r"CORRAL-TEST-BOOTED node=(\S+) ip=(\S+)", BOOT_TIMEOUT)
            booted = vm.elapsed
            assert vm.wait_exit(30) == 0
        record_property("boot_seconds", round(booted, 1))
        print(f"\npxelinux: booted marker after {booted:.1f} s")
        assert (m.group(1), m.group(2)) == ("vm3", ip)
        assert "PXELINUX" in vm.console()
        [post] = bed.posts()
        assert post["path"] == "/api/v1/nodes/vm3/events"
        assert post["authorization"] is None  # no token initrd
        assert json.loads(post["body"])["phase"] == "booted"


@pytest.mark.vm_harness
def test_discover_boot(tmp_path: Path, assets: BootAssets, record_property: Any) -> None:
    mac, ip = "52:54:00:00:00:04", f"{SUBNET}.53"
    url = f"http://{SUBNET}.1:{HTTP_PORT}"
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    with pxe_bed(tmp_path, "discover", ipxe_dhcp_boot(url), {mac: ip}) as bed:
        _serve_assets(assets, bed.http)
        (bed.http / "boot.ipxe").write_text(
            "#!ipxe\n"
            f"kernel {url}/vmlinuz initrd=initrd.gz corral.server={url} corral.discover=1"
            " console=ttyS0 quiet\n"
            f"initrd {url}/initrd.gz\n"
            "boot\n"
        )
        with VM(bed.net, workdir=tmp_path / "vm", mac=mac, disks=[disk]) as vm:
            m = vm.wait_for(r"CORRAL-TEST-DISCOVERED mac=(\S+)", BOOT_TIMEOUT)
            booted = vm.elapsed
            assert vm.wait_exit(30) == 0
        record_property("boot_seconds", round(booted, 1))
        print(f"\ndiscover: marker after {booted:.1f} s")
        assert m.group(1) == mac
        [post] = bed.posts()
        assert post["path"] == "/api/v1/discover"
        report = json.loads(post["body"])
        assert report["mac"] == mac
        assert report["cpus"] == 1
        assert 300 < report["memory_mb"] <= 512
        assert report["disks"] == [{"name": "vda", "size_bytes": 64 << 20}]
        assert report["nics"] == [{"name": "eth0", "mac": mac}]
