"""The boot steps corral serves: dnsmasq's log lines read into answers and steps, boot file
names into phases, and the steps stored on the node that took them (by MAC or address),
unknown machines' rate-limited."""

from __future__ import annotations

import time

import pytest

from corral.agent import phases
from corral.inventory import db
from corral.inventory.state import NodeStates
from corral.serve.dhcplog import DhcpAnswer, DhcpLogParser, boot_step, is_detail, parse_line
from corral.serve.steps import UNKNOWN_PER_MINUTE, BootSteps, Step, boot_file_phase, tftp_step

P = "dnsmasq-dhcp[2107]: "
# One PXE ROM's exchange with log-dhcp, as dnsmasq 2.90 wrote it (options trimmed).
PXE_EXCHANGE = [
    f"{P}2607067961 available DHCP subnet: 10.77.0.0/255.255.255.0",
    f"{P}2607067961 vendor class: PXEClient:Arch:00000:UNDI:002001",
    f"{P}2607067961 DHCPDISCOVER(br0) 52:54:00:c0:ff:01 ",
    f"{P}2607067961 tags: known, bios, br0",
    f"{P}2607067961 DHCPOFFER(br0) 10.77.0.11 52:54:00:c0:ff:01 ",
    f"{P}2607067961 requested options: 1:netmask, 3:router, 6:dns-server, 12:hostname, ",
    f"{P}2607067961 bootfile name: undionly.kpxe",
    f"{P}2607067961 next server: 10.77.0.1",
    f"{P}2607067961 sent size:  1 option: 53 message-type  2",
    f"{P}2607067961 available DHCP subnet: 10.77.0.0/255.255.255.0",
    f"{P}2607067961 DHCPREQUEST(br0) 10.77.0.11 52:54:00:c0:ff:01 ",
    f"{P}2607067961 tags: known, bios, br0",
    f"{P}2607067961 DHCPACK(br0) 10.77.0.11 52:54:00:c0:ff:01 node01",
    f"{P}2607067961 bootfile name: undionly.kpxe",
    f"{P}2607067961 sent size:  4 option: 51 lease-time  1h",
]
# The same node's installed system renewing its lease: no boot file.
RENEWAL = [
    f"{P}98717478 vendor class: udhcp 1.35.0",
    f"{P}98717478 DHCPREQUEST(br0) 10.77.0.11 52:54:00:c0:ff:01 ",
    f"{P}98717478 DHCPACK(br0) 10.77.0.11 52:54:00:c0:ff:01 node01",
    f"{P}98717478 next server: 10.77.0.1",
]


def answers(lines: list[str]) -> list[DhcpAnswer]:
    parser = DhcpLogParser()
    got = [a for line in lines for a in parser.feed(line)]
    return got + parser.flush()


def steps(lines: list[str]) -> list[str]:
    return [s.message for a in answers(lines) if (s := boot_step(a)) is not None]


def test_a_pxe_exchange_is_an_offer_and_an_acknowledgement_naming_the_loader() -> None:
    got = answers(PXE_EXCHANGE)
    assert [(a.kind, a.ip, a.bootfile) for a in got] == [
        ("DHCPDISCOVER", None, None),
        ("DHCPOFFER", "10.77.0.11", "undionly.kpxe"),
        ("DHCPREQUEST", "10.77.0.11", None),
        ("DHCPACK", "10.77.0.11", "undionly.kpxe"),
    ]
    assert {a.mac for a in got} == {"52:54:00:c0:ff:01"}
    assert got[-1].text == "node01"
    assert steps(PXE_EXCHANGE) == ["10.77.0.11 offered", "10.77.0.11 acknowledged (undionly.kpxe)"]
    step = boot_step(got[-1])
    assert step == Step(phases.DHCP, "10.77.0.11 acknowledged (undionly.kpxe)", None, got[-1].mac)


def test_an_operating_systems_dhcp_is_no_boot_step() -> None:
    assert [a.kind for a in answers(RENEWAL)] == ["DHCPREQUEST", "DHCPACK"]
    assert steps(RENEWAL) == []
    # without log-dhcp there is no boot file to tell: nothing is taken for a boot
    assert steps([f"{P}DHCPACK(br0) 10.77.0.11 52:54:00:c0:ff:01 node01"]) == []


def test_the_boot_file_sent_as_option_67_counts_too() -> None:
    """OVMF's PXE and iPXE ask for option 67: dnsmasq sends (and logs) the file there."""
    lines = [
        f"{P}1948242001 DHCPACK(br0) 10.88.0.53 52:54:00:00:01:03 efipxe1",
        f"{P}1948242001 requested options: 66:tftp-server, 67:bootfile-name",
        f"{P}1948242001 sent size:  9 option: 67 bootfile-name  ipxe.efi",
        f"{P}1948242001 sent size:  4 option: 51 lease-time  1h",
    ]
    assert steps(lines) == ["10.88.0.53 acknowledged (ipxe.efi)"]


def test_interleaved_exchanges_keep_their_own_boot_files() -> None:
    ipxe = [
        f"{P}11 DHCPACK(br0) 10.77.0.12 52:54:00:c0:ff:02 node02",
        f"{P}11 bootfile name: http://10.77.0.1:8080/boot/ipxe",
    ]
    assert steps(RENEWAL[:3] + ipxe + RENEWAL[3:]) == [
        "10.77.0.12 acknowledged (http://10.77.0.1:8080/boot/ipxe)"
    ]


def test_refusals_proxy_offers_and_the_boot_server() -> None:
    lines = [
        f"{P}1937544738 DHCPDISCOVER(br0) 52:54:00:c0:ff:99 no address available",
        f"{P}1800517436 PXE(br0) 52:54:00:c0:ff:01 proxy",
        f"{P}1800517436 bootfile name: undionly.kpxe",
        f"{P}1800517436 broadcast response",
        f"{P}55 PXE(br0) 52:54:00:c0:ff:02 proxy",
        f"{P}56 PXE(br0) 52:54:00:c0:ff:03 proxy-ignored",
        f"{P}57 DHCPNAK(br0) 10.77.0.11 52:54:00:c0:ff:01 wrong address",
        f"{P}58 DHCPDISCOVER(br0) 52:54:00:c0:ff:01 ",
    ]
    assert steps(lines) == [
        "asked for an address: no address available",
        "proxy offer (undionly.kpxe)",
        "proxy offer, boot file from port 4011",
        "10.77.0.11 refused (wrong address)",
    ]


def test_lines_that_are_not_answers() -> None:
    assert parse_line("dnsmasq[7]: started, version 2.90 DNS disabled") == (None, None)
    assert parse_line(f"{P}read /run/corral/dhcp-x/dhcp-hosts") == (None, None)
    assert parse_line(f"{P}9 DHCPACK(ib0) 10.0.0.1 20:00:55:04:01:fe:80:00") == ("9", None)
    assert is_detail(f"{P}9 sent size:  4 option: 51 lease-time  1h")
    assert is_detail(f"{P}9 bootfile name: ipxe.efi")
    assert not is_detail(f"{P}9 DHCPACK(br0) 10.0.0.1 52:54:00:c0:ff:01 n1")
    assert not is_detail(f"{P}DHCPACK(br0) 10.0.0.1 52:54:00:c0:ff:01 n1")
    assert not is_detail("dnsmasq: failed to create listening socket: Address in use")


@pytest.mark.parametrize(
    ("path", "phase"),
    [
        ("undionly.kpxe", phases.LOADER),
        ("ipxe.efi", phases.LOADER),
        ("pxelinux.0", phases.LOADER),
        ("ldlinux.c32", phases.LOADER),
        ("grubnetx64.efi", phases.LOADER),
        ("pxelinux.cfg/01-52-54-00-00-00-01", phases.BOOT_CONFIG),
        ("pxelinux.cfg/default", phases.BOOT_CONFIG),
        ("grub/grub.cfg-01-52:54:00:00:00:01", phases.BOOT_CONFIG),
        ("grub/grub.cfg", phases.BOOT_CONFIG),
        ("distros/debian12/vmlinuz", phases.KERNEL),
        ("distros/debian12/linux", phases.KERNEL),
        ("distros/debian12/initrd.gz", phases.INITRD),
        ("corral/ramdisk/vmlinuz", phases.KERNEL),
        ("corral/ramdisk/initrd.img", phases.INITRD),
        ("corral/diskless/dl1/initrd.img", phases.INITRD),
        ("boot/token/c01.cpio.gz", phases.INITRD),
        ("grub/x86_64-efi/normal.mod", None),
        ("grub/fonts/unicode.pf2", None),
    ],
)
def test_boot_file_phases(path: str, phase: str | None) -> None:
    assert boot_file_phase(path) == phase


def test_tftp_steps_name_the_file_its_size_and_what_went_wrong() -> None:
    ok = tftp_step("ipxe.efi", "10.0.0.11", 1_040_384, None)
    assert ok == Step(phases.LOADER, "ipxe.efi over TFTP (1.0 MB)", "10.0.0.11", None)
    cfg = tftp_step("pxelinux.cfg/01-52-54-00-00-00-01", "10.0.0.11", 300, None)
    assert cfg is not None and cfg.mac == "52:54:00:00:00:01"
    assert cfg.message == "pxelinux.cfg/01-52-54-00-00-00-01 over TFTP (300 B)"
    gone = tftp_step("ipxe.efi", "10.0.0.11", 512_000, "timeout after 5 retransmissions")
    assert gone is not None
    assert (
        gone.message == "ipxe.efi over TFTP failed after 512.0 kB: timeout after 5 retransmissions"
    )
    missing = tftp_step("pxelinux.0", "10.0.0.11", 0, "file not found")
    assert missing is not None and missing.message == "pxelinux.0 over TFTP failed: file not found"
    # pxelinux tries config names until one is there: the missing ones are no steps
    assert tftp_step("pxelinux.cfg/C0A8000B", "10.0.0.11", 0, "file not found") is None
    token = tftp_step("boot/token/c01.cpio.gz", "10.0.0.11", 200, None)
    assert token is not None and token.message == "token over TFTP (200 B)"


# -- stored on the node ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stored(node: str | None = None) -> list[tuple[str, str | None, str, str]]:
    with db.session() as s:
        from corral.serve.events import stored_events

        rows = stored_events(s, nodes=[node] if node is not None else None)
        return [(r.node, r.mac, r.phase, r.message) for r in rows]


def test_a_step_goes_to_the_node_by_mac_or_by_address(fixture_cluster: None) -> None:
    recorder = BootSteps(db.session)
    by_mac = Step(phases.DHCP, "10.0.0.11 acknowledged (ipxe.efi)", mac="52:54:00:00:00:01")
    assert recorder.record(by_mac, "dnsmasq") == "c01"
    assert recorder.record(Step(phases.LOADER, "ipxe.efi over TFTP (1.0 MB)", "10.0.0.11")) == "c01"
    assert stored("c01")[-2:] == [
        ("c01", None, phases.DHCP, "10.0.0.11 acknowledged (ipxe.efi)"),
        ("c01", None, phases.LOADER, "ipxe.efi over TFTP (1.0 MB)"),
    ]
    with db.session() as s:
        status = NodeStates(s).status("c01")
    assert (status.state, status.phase) == ("armed", phases.LOADER)


def test_unknown_machines_are_recorded_once_a_minute_each_and_boundedly(
    fixture_cluster: None,
) -> None:
    clock = Clock()
    recorder = BootSteps(db.session, clock)
    stranger = Step(
        phases.DHCP, "asked for an address: no address available", mac="02:00:00:00:00:01"
    )
    assert recorder.record(stranger, "dnsmasq") == ""
    assert recorder.record(stranger, "dnsmasq") is None  # again within the minute
    # its address is remembered from DHCP: its TFTP fetch names its MAC
    recorder.remember("10.0.0.200", "02:00:00:00:00:01")
    assert recorder.record(Step(phases.LOADER, "ipxe.efi over TFTP (1.0 MB)", "10.0.0.200")) == ""
    clock.now += 61
    assert recorder.record(stranger, "dnsmasq") == ""
    assert stored("") == [
        ("", "02:00:00:00:00:01", phases.DHCP, "asked for an address: no address available"),
        ("", "02:00:00:00:00:01", phases.LOADER, "ipxe.efi over TFTP (1.0 MB)"),
        ("", "02:00:00:00:00:01", phases.DHCP, "asked for an address: no address available"),
    ]
    # a flood of made-up MACs: at most UNKNOWN_PER_MINUTE a minute, all together
    clock.now += 61
    kept = sum(
        recorder.record(Step(phases.DHCP, "asked", mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}"))
        == ""
        for i in range(UNKNOWN_PER_MINUTE + 50)
    )
    assert kept == UNKNOWN_PER_MINUTE


def test_a_failing_database_does_not_fail_the_boot(
    fixture_cluster: None, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> object:
        raise RuntimeError("database is locked")

    recorder = BootSteps(broken)  # type: ignore[arg-type]
    assert recorder.record(Step(phases.KERNEL, "vmlinuz over HTTP", "10.0.0.11")) is None
    assert "could not store boot step kernel" in caplog.text


def test_queued_steps_are_stored_by_the_writer(fixture_cluster: None) -> None:
    recorder = BootSteps(db.session)
    recorder.start()
    try:
        step = Step(phases.DHCP, "10.0.0.11 offered", mac="52:54:00:00:00:01")
        recorder.later(step, "dnsmasq")
    finally:
        recorder.stop()  # stores what is queued first
    assert stored("c01")[-1] == ("c01", None, phases.DHCP, "10.0.0.11 offered")


def test_a_step_told_late_is_history_and_does_not_move_the_node_back(
    fixture_cluster: None,
) -> None:
    """dnsmasq's line may be stored after the loader its answer led to was fetched."""
    recorder = BootSteps(db.session)
    acked = time.time()
    recorder.record(Step(phases.LOADER, "ipxe.efi over TFTP (1.0 MB)", "10.0.0.11"))
    late = Step(phases.DHCP, "10.0.0.11 acknowledged (ipxe.efi)", mac="52:54:00:00:00:01", at=acked)
    assert recorder.record(late, "dnsmasq") == "c01"
    with db.session() as s:
        states = NodeStates(s)
        assert states.status("c01").phase == phases.LOADER
        steps = [(e.phase, e.time) for e in states.boot_steps("c01", 0)]
    assert steps[0] == (phases.DHCP, acked)  # in the order they happened
    assert steps[1][0] == phases.LOADER
