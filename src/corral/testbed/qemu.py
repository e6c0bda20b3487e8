"""A qemu VM that network-boots inside a :class:`~corral.testbed.netns.PxeNetwork`.

The VM runs under TCG (KVM does not work on the test machines), boots from its virtio
NIC (``-boot n``) and writes its serial console to a file that :meth:`VM.wait_for` reads.

The NIC's option ROM is qemu's iPXE build from the ipxe-qemu package. Its
``efi-virtio.rom`` is a combined ROM: a legacy PXE image (used by SeaBIOS) followed by
an EFI image (used by OVMF), and qemu picks it for ``virtio-net-pci`` by default
(searching ``/usr/lib/ipxe/qemu``). Leave ``romfile`` unset: qemu patches the PCI device
ID inside its *default* ROM only. The ROM says 0x1041 (modern virtio-net) while the
transitional device is 0x1000, so the same file given as ``romfile=`` is silently
skipped by SeaBIOS ("Booting from Floppy..."); it only works with
``disable-legacy=on``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from corral.errors import CorralError
from corral.run import spawn, stop
from corral.testbed.netns import PxeNetwork

log = logging.getLogger(__name__)

Firmware = Literal["bios", "uefi"]

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
#: NICs a VM may have: virtio, and the Intel ones real servers carry (their iPXE ROMs are
#: qemu's defaults, from ipxe-qemu)
NIC_MODELS = ("virtio-net-pci", "e1000e", "e1000")
#: How a VM's disks are attached: virtio, or as a real server's NVMe or SATA (AHCI) disk
DISK_BUSES = ("virtio", "nvme", "ahci")

#: PCI option ROM code types (PCI firmware spec, "PCI Data Structure").
ROM_CODE_X86 = 0
ROM_CODE_EFI = 3

#: Console output after which waiting longer is pointless.
BOOT_FAILURE = (
    r"No bootable device|Kernel panic|CORRAL-TEST-FAILED"
    r"|No configuration methods succeeded|Unable to mount root fs"
)

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class VMError(CorralError):
    """A test VM did not do what was expected."""


class VMTimeout(VMError, TimeoutError):
    """:meth:`VM.wait_for` ran out of time."""


def rom_code_types(path: Path) -> list[int]:
    """The code types of the images chained in a PCI option ROM (0 = x86 BIOS, 3 = EFI)."""
    data = path.read_bytes()
    types: list[int] = []
    offset = 0
    while offset + 0x1A <= len(data) and data[offset : offset + 2] == b"\x55\xaa":
        pcir = offset + int.from_bytes(data[offset + 0x18 : offset + 0x1A], "little")
        if data[pcir : pcir + 4] != b"PCIR":
            break
        length = int.from_bytes(data[pcir + 0x10 : pcir + 0x12], "little") * 512
        types.append(data[pcir + 0x14])
        if data[pcir + 0x15] & 0x80 or length == 0:  # last image
            break
        offset += length
    return types


def _opt(value: str | Path) -> str:
    """Quote a value for a qemu option list (a comma is written twice)."""
    return str(value).replace(",", ",,")


class VM:
    """One qemu VM on a tap of ``network``; stopped (by pid) when the block ends.

    Entering creates tap ``tap`` on the network's bridge and starts qemu inside the
    namespace; leaving stops qemu (SIGTERM, then SIGKILL) and removes the tap, also when
    the block raised. ``workdir`` receives ``<name>.console.log`` (the serial console),
    ``<name>.qemu.log`` (qemu's own messages) and, for ``firmware="uefi"``, the VM's copy
    of ``OVMF_VARS_4M.fd``. ``romfile=None`` keeps qemu's default iPXE ROM (see the module
    documentation); ``option_rom=False`` gives the NIC no ROM at all, so that OVMF's own
    PXE client boots (SeaBIOS has none); ``disks`` are raw images attached as virtio
    disks (``/dev/vda``...; ``disk_bus`` "nvme" or "ahci" for ``nvme0n1``, ``sda``), booted
    after the network; ``nic`` is the NIC model (``e1000e`` needs the ramdisk's generic
    kernel). ``reboot`` lets a guest's reboot restart it (the OVMF variables survive it)
    rather than end qemu.

    >>> with VM(net, workdir=tmp, mac="52:54:00:00:00:01") as vm:   # doctest: +SKIP
    ...     m = vm.wait_for(r"CORRAL-TEST-BOOTED node=(\\S+) ip=(\\S+)", timeout=180)
    """

    def __init__(
        self,
        network: PxeNetwork,
        *,
        workdir: Path,
        mac: str,
        name: str = "vm",
        tap: str = "tap0",
        firmware: Firmware = "bios",
        memory_mb: int = 512,
        cpus: int = 1,
        romfile: Path | None = None,
        option_rom: bool = True,
        disks: Sequence[Path] = (),
        extra_args: Sequence[str] = (),
        reboot: bool = False,
        nic: str = "virtio-net-pci",
        disk_bus: str = "virtio",
    ) -> None:
        mac = mac.lower()
        if not _MAC.match(mac):
            raise VMError(f"bad MAC address {mac!r}")
        if firmware not in ("bios", "uefi"):
            raise VMError(f"unknown firmware {firmware!r}: use 'bios' or 'uefi'")
        self.network = network
        self.workdir = workdir
        self.mac = mac
        self.name = name
        self.tap = tap
        self.firmware: Firmware = firmware
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.romfile = romfile
        self.option_rom = option_rom
        self.disks = tuple(disks)
        self.extra_args = tuple(extra_args)
        self.reboot = reboot
        if nic not in NIC_MODELS:
            raise VMError(f"unknown NIC model {nic!r}: use one of {', '.join(NIC_MODELS)}")
        if disk_bus not in DISK_BUSES:
            raise VMError(f"unknown disk bus {disk_bus!r}: use one of {', '.join(DISK_BUSES)}")
        self.nic = nic
        self.disk_bus = disk_bus
        self.console_log = workdir / f"{name}.console.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self.vars_copy = workdir / f"{name}.OVMF_VARS.fd"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._tap_added = False

    def argv(self) -> list[str]:
        """The qemu command line (without the ``ip netns exec`` prefix)."""
        nic = f"{self.nic},netdev=n0,mac={self.mac},bootindex=1"
        if not self.option_rom:
            nic += ",romfile="
        elif self.romfile is not None:
            nic += f",romfile={_opt(self.romfile)}"
        argv = [
            QEMU,
            "-name",
            _opt(self.name),
            "-accel",
            "tcg",
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.console_log}",
            *([] if self.reboot else ["-no-reboot"]),
            "-netdev",
            f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device",
            nic,
        ]
        if self.firmware == "uefi":
            argv += [
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(OVMF_CODE)}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={_opt(self.vars_copy)}",
            ]
        # network first, then the disks: a node that is not armed gets a script that exits
        # iPXE, and the firmware boots the next device, as netboot-once wants
        if self.disks and self.disk_bus == "ahci":
            argv += ["-device", "ahci,id=ahci0"]
        for index, disk in enumerate(self.disks):
            device = {
                "virtio": f"virtio-blk-pci,drive=disk{index}",
                "nvme": f"nvme,drive=disk{index},serial=corral{index}",
                "ahci": f"ide-hd,drive=disk{index},bus=ahci0.{index}",
            }[self.disk_bus]
            argv += [
                "-drive",
                f"if=none,id=disk{index},format=raw,file={_opt(disk)}",
                "-device",
                f"{device},bootindex={index + 2}",
            ]
        return argv + list(self.extra_args)

    # --- life cycle --------------------------------------------------------------------

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self.process is not None:
            raise VMError(f"VM {self.name} already started")
        if shutil.which(QEMU) is None:
            raise VMError(f"{QEMU} not found", "apt-get install qemu-system-x86")
        rom = IPXE_ROM if self.romfile is None else self.romfile
        if self.option_rom and not rom.is_file():
            raise VMError(f"{rom} not found", "apt-get install ipxe-qemu")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.firmware == "uefi":
            if not OVMF_CODE.is_file() or not OVMF_VARS.is_file():
                raise VMError(f"{OVMF_CODE} or {OVMF_VARS} not found", "apt-get install ovmf")
            shutil.copyfile(OVMF_VARS, self.vars_copy)
        self.console_log.write_bytes(b"")
        self.network.add_tap(self.tap)
        self._tap_added = True
        try:
            with self.qemu_log.open("wb") as out:
                self.process = spawn(
                    self.network.exec(self.argv()), stdout=out.fileno(), stderr=subprocess.STDOUT
                )
            self.started_at = time.monotonic()
            log.info("VM %s started: pid %d", self.name, self.process.pid)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 5.0) -> None:
        """Stop qemu (SIGTERM, then SIGKILL after ``grace`` s) and remove the tap."""
        proc = self.process
        if proc is not None:
            try:
                stop(proc, grace, reap=30)
            finally:
                self.process = None
        if self._tap_added:
            self._tap_added = False
            self.network.remove_link(self.tap)

    # --- watching ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def elapsed(self) -> float:
        """Seconds since qemu was started."""
        return time.monotonic() - self.started_at

    def console(self) -> str:
        """Everything the VM wrote to its serial console so far."""
        try:
            return self.console_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 25) -> str:
        text = self.console().replace("\r", "")
        console = "\n".join(text.splitlines()[-lines:])
        try:
            qemu = self.qemu_log.read_text(errors="replace").strip()
        except FileNotFoundError:
            qemu = ""
        return f"--- console (last {lines} lines) ---\n{console}\n--- qemu ---\n{qemu[-2000:]}"

    def wait_for(
        self,
        pattern: str,
        timeout: float,
        *,
        fail: str | None = BOOT_FAILURE,
        poll: float = 0.25,
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, multi-line) appears on the console; return it.

        Raises :class:`VMTimeout` after ``timeout`` seconds, and :class:`VMError` if qemu
        exits first or the console shows ``fail`` (a regex; ``None`` to wait regardless);
        both carry the end of the console.
        """
        regex = re.compile(pattern, re.MULTILINE)
        failure = re.compile(fail, re.MULTILINE) if fail else None
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            text = self.console()
            match = regex.search(text)
            if match is not None:
                return match
            bad = failure.search(text) if failure else None
            if bad is not None:
                raise VMError(
                    f"VM {self.name}: {bad.group(0)!r} on the console after {self.elapsed:.0f} s "
                    f"(waiting for {pattern!r})\n" + self._tail()
                )
            if exited:
                code = None if self.process is None else self.process.returncode
                raise VMError(
                    f"VM {self.name}: qemu exited (code {code}) before {pattern!r} appeared\n"
                    + self._tail()
                )
            if time.monotonic() >= deadline:
                raise VMTimeout(
                    f"VM {self.name}: no {pattern!r} on the console after {timeout:.0f} s\n"
                    + self._tail()
                )
            time.sleep(poll)

    def wait_exit(self, timeout: float) -> int:
        """Wait for qemu to exit by itself (the guest powered off); return its exit code."""
        if self.process is None:
            raise VMError(f"VM {self.name} is not running")
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise VMTimeout(
                f"VM {self.name}: still running after {timeout:.0f} s\n" + self._tail()
            ) from exc
