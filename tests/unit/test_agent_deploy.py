"""The agent's installer around its tools: fakes for the commands and the server; the real
tools are driven in tests/integration/test_agent_deploy.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from corral.agent import disk, identity
from corral.agent.cmdline import BootOrders
from corral.agent.deploy import Installer, InstallSettings, Reporter
from corral.agent.disk import DiskError, DiskTooSmall, Layout
from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.main import Agent, Paths, Settings
from corral.agent.plan import (
    Chunk,
    Disk,
    Identity,
    ImageInfo,
    Interface,
    Partition,
    Plan,
    Progress,
    TransportInfo,
)
from corral.agent.receivers import receiver_class
from corral.agent.receivers.base import Context, Job, Received, Receiver
from corral.agent.receivers.http import HttpReceiver
from corral.agent.receivers.rsync import RsyncReceiver, parse_progress2, parse_stats
from corral.agent.report import Client, Rejected, ReportError
from corral.agent.run import Result
from tests.fakes import ChunkServer

MiB = 1 << 20
GPT_LINUX = disk.GPT_TYPES["linux"]


def counter() -> Any:
    """Predictable UUIDs: 00000000-0000-4000-8000-00000000000N."""
    n = iter(range(1, 1000))
    return lambda: f"00000000-0000-4000-8000-{next(n):012d}"


def layout_of(partitions: list[Partition], label: str = "gpt", **kw: Any) -> Layout:
    return disk.make_layout(
        Disk("/dev/sda", label, partitions),
        "/dev/sda",
        uuid=counter(),
        vfat_id=lambda: "ABCD-1234",
        **kw,
    )


STANDARD = [
    Partition("/boot/efi", "efi", 512),
    Partition("/boot", "ext4", 1024),
    Partition("swap", "swap", 2048),
    Partition("/", "xfs", 8192, grow=True),
]


# --- the layout ------------------------------------------------------------------------


def test_layout_numbers_labels_and_identifies_partitions() -> None:
    layout = layout_of(STANDARD, bootloader="grub", efi_firmware=True)
    assert [(v.number, v.mount, v.fstype, v.label, v.device) for v in layout.volumes] == [
        (1, "biosboot", "biosboot", "", "/dev/sda1"),
        (2, "/boot/efi", "efi", "EFI", "/dev/sda2"),
        (3, "/boot", "ext4", "boot", "/dev/sda3"),
        (4, "swap", "swap", "swap", "/dev/sda4"),
        (5, "/", "xfs", "root", "/dev/sda5"),
    ]
    assert layout.volumes[0].uuid == ""
    assert layout.volumes[1].uuid == "ABCD-1234"
    assert layout.root.uuid == "00000000-0000-4000-8000-000000000003"
    assert layout.label_id == "00000000-0000-4000-8000-000000000004"
    assert layout.esp is layout.volumes[1] and layout.has_biosboot


def test_grub_on_gpt_gets_both_firmwares_boot_partitions_first() -> None:
    """The default layout boots BIOS and UEFI alike: a BIOS boot partition and an ESP."""
    for efi in (False, True):
        layout = layout_of(STANDARD[1:], bootloader="grub", efi_firmware=efi)
        assert [(v.number, v.mount, v.fstype, v.size_mb) for v in layout.volumes[:2]] == [
            (1, "biosboot", "biosboot", 1),
            (2, "/boot/efi", "efi", disk.ESP_MB),
        ]
        assert layout.has_biosboot and layout.esp is not None and layout.root.number == 5
    assert not layout_of(STANDARD[1:], bootloader="none").has_biosboot
    assert layout_of(STANDARD[1:], bootloader="none").esp is None
    assert not layout_of(STANDARD[1:], "dos", bootloader="grub").has_biosboot


def test_partition_devices() -> None:
    assert disk.partition_device("/dev/sda", 2) == "/dev/sda2"
    assert disk.partition_device("/dev/nvme0n1", 1) == "/dev/nvme0n1p1"
    assert disk.partition_device("/dev/loop7", 3) == "/dev/loop7p3"


@pytest.mark.parametrize(
    ("partitions", "label", "message"),
    [
        ([Partition("/boot", "ext4", 100)], "gpt", "exactly one partition mounted at /"),
        ([Partition("/", "ext4", 100), Partition("/", "xfs", 100)], "gpt", "exactly one"),
        ([Partition("/", "btrfs", 100)], "gpt", "unknown filesystem 'btrfs'"),
        ([Partition("/", "ext4", 100)], "mbr", "use gpt or dos"),
        ([Partition("/", "ext4", 0)], "gpt", "size 0 MiB"),
        ([Partition("home", "ext4", 10), Partition("/", "ext4", 10)], "gpt", "absolute path"),
        (
            [Partition("biosboot", "biosboot", 1), Partition("/", "ext4", 10)],
            "dos",
            "needs a gpt",
        ),
        (
            [Partition(f"/d{i}", "ext4", 10) for i in range(4)] + [Partition("/", "ext4", 10)],
            "dos",
            "holds 4 partitions",
        ),
    ],
)
def test_bad_layouts(partitions: list[Partition], label: str, message: str) -> None:
    with pytest.raises(DiskError, match=message):
        layout_of(partitions, label)


def test_size_check() -> None:
    layout = layout_of(STANDARD)
    # fixed sizes 512 + 1024 + 2048 + 8192 (the growing / at least its size) + 2 of table
    assert disk.required_mb(layout, 1 << 30) == 11778
    disk.check_size(layout, 1 << 30, 11778 * MiB)
    with pytest.raises(DiskTooSmall, match=r"disk /dev/sda is too small: 11777 MiB, .* 11778 MiB"):
        disk.check_size(layout, 1 << 30, 11777 * MiB)
    # an image bigger than / asks for 1.1 times itself
    assert disk.required_mb(layout, 10 << 30) == 3586 + 11264
    fixed = layout_of([Partition("/", "ext4", 1000)])
    with pytest.raises(DiskTooSmall, match=r"the / partition \(1000 MiB\) cannot hold the image"):
        disk.check_size(fixed, 1000 * MiB, 100 << 30)


def test_sfdisk_script_gpt() -> None:
    layout = layout_of(STANDARD[1:], bootloader="grub")
    script = disk.sfdisk_script(layout, 20 << 30)
    assert script == (
        "label: gpt\n"
        f"label-id: {layout.label_id}\n"
        "\n"
        f"start=2048, size=1MiB, type={disk.GPT_TYPES['biosboot']}, name=biosboot\n"
        f"size=128MiB, type={disk.GPT_TYPES['efi']}, name=EFI\n"
        f"size=1024MiB, type={GPT_LINUX}, name=boot\n"
        f"size=2048MiB, type={disk.GPT_TYPES['swap']}, name=swap\n"
        f"type={GPT_LINUX}, name=root\n"
    )


def test_sfdisk_script_dos_and_a_growing_partition_in_the_middle() -> None:
    parts = [
        Partition("/", "ext4", 1000, grow=True),
        Partition("/var", "ext4", 1000, grow=True),
        Partition("swap", "swap", 500),
    ]
    layout = layout_of(parts, "dos")
    assert layout.label_id.startswith("0x") and len(layout.label_id) == 10
    # 10 GiB: 10240 - 2 (table) - 2500 fixed = 7738 spare, 3869 for each growing one
    assert disk.sizes_mb(layout, 10 << 30) == [4869, 4869, 500]
    assert disk.sfdisk_script(layout, 10 << 30).splitlines()[3:] == [
        "start=2048, size=4869MiB, type=83, bootable",
        "size=4869MiB, type=83",
        "size=500MiB, type=82",
    ]


def test_mkfs_commands() -> None:
    layout = layout_of(STANDARD)
    assert [disk.mkfs_argv(v) for v in layout.volumes] == [
        ["mkfs.vfat", "-n", "EFI", "-i", "ABCD1234", "-F", "32", "/dev/sda1"],
        ["mkfs.ext4", "-F", "-q", "-L", "boot", "-U", layout.volumes[1].uuid, "/dev/sda2"],
        ["mkswap", "-L", "swap", "-U", layout.volumes[2].uuid, "/dev/sda3"],
        ["mkfs.xfs", "-f", "-q", "-L", "root", "-m", f"uuid={layout.root.uuid}", "/dev/sda4"],
    ]
    bios = layout_of([Partition("/", "ext4", 10)], bootloader="grub")
    assert disk.mkfs_argv(bios.volumes[0]) is None


def test_stamp_round_trip() -> None:
    layout = layout_of(STANDARD)
    again = Layout.from_stamp(json.loads(json.dumps(layout.to_stamp())), "/dev/sda")
    assert again == layout
    moved = Layout.from_stamp(layout.to_stamp(), "/dev/vdb")
    assert moved.root.device == "/dev/vdb4"
    with pytest.raises(ValueError, match="stamp format"):
        Layout.from_stamp({**layout.to_stamp(), "format": 99}, "/dev/sda")
    with pytest.raises(ValueError, match="malformed"):
        Layout.from_stamp({"format": 1}, "/dev/sda")


def test_mounts_under(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "/dev/loop0p3 /run/corral/target ext4 rw 0 0\n"
        "/dev/loop0p1 /run/corral/target/boot ext4 rw 0 0\n"
        "proc /run/corral/target/boot/with\\040space proc rw 0 0\n"
        "/dev/x /run/corral/target2 ext4 rw 0 0\n"
    )
    assert disk.mounts_under(Path("/run/corral/target"), mounts) == [
        "/run/corral/target/boot/with space",
        "/run/corral/target/boot",
        "/run/corral/target",
    ]


# --- a fake machine for the installer -------------------------------------------------


@dataclass
class FakeRunner:
    """Records argv; plays sfdisk (makes the partition "devices" as files), blockdev and the
    rest; ``fail`` maps a program name to (exit code, stderr)."""

    disk_bytes: int
    calls: list[list[str]] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    fail: dict[str, tuple[int, str]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    hook: Any = None

    def answer(self, name: str, answers: list[tuple[int, str]]) -> None:
        """Answer the next calls of program ``name`` with these (exit code, stderr) in
        turn; code 0 lets the call go as it would (through :attr:`hook`)."""

        def next_answer(args: list[str], env: Any) -> None:
            if args[0] == name:
                code, err = answers.pop(0)
                self.fail.pop(name, None)
                if code:
                    self.fail[name] = (code, err)

        self.hook = next_answer

    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        args = list(argv)
        self.calls.append(args)
        name = args[0]
        if input is not None:
            self.inputs[name] = input
        if self.hook:
            self.hook(args, env)
        if name in self.fail:
            code, err = self.fail[name]
            return Result(tuple(args), code, "", err)
        if args[:2] == ["blockdev", "--getsize64"]:
            return Result(tuple(args), 0, f"{self.disk_bytes}\n")
        if name == "sfdisk" and "--json" in args:
            if name in self.outputs:
                return Result(tuple(args), 0, self.outputs[name])
            return Result(tuple(args), 1, "", "does not contain a recognized partition table")
        if name == "sfdisk":
            device = args[-1]
            for n in range(1, (input or "").count("type=") + 1):
                Path(disk.partition_device(device, n)).touch()
        out = self.outputs.get(name, "")
        return Result(tuple(args), 0, out)

    def programs(self) -> list[str]:
        return [c[0] if c[0] != "chroot" else f"chroot {c[2]}" for c in self.calls]


@dataclass
class FakeClient:
    """Records progress posts; answers ``cancel`` once a post of phase ``cancel_at`` came."""

    posts: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    cancel_at: str | None = None
    fail: bool = False
    server: str = "http://corral.test:8080"
    token: str | None = "t0ken"

    def post(self, path: str, payload: dict[str, Any], *, auth: bool = True) -> Any:
        self.paths.append(path)
        self.posts.append(payload)
        if self.fail:
            raise ReportError("server down")
        return {"cancel": self.cancel_at is not None and payload["phase"] == self.cancel_at}

    def close(self) -> None:
        pass


class FakeReceiver(Receiver):
    """Unpacks a few files as if the image had them; waits for a cancel when told to."""

    name = "fake"
    wait_for_cancel: ClassVar[bool] = False

    def receive(self, job: Job) -> Received:
        for rel in ("usr/sbin/grub-install", "usr/sbin/update-grub", "usr/bin/bash"):
            (job.target / rel).parent.mkdir(parents=True, exist_ok=True)
            (job.target / rel).write_text("#!/bin/sh\n")
        (job.target / "etc/network").mkdir(parents=True, exist_ok=True)
        (job.target / "etc/network/interfaces").write_text("auto lo\n")
        job.progress(500, 1000)
        if self.wait_for_cancel:
            if job.cancel.wait(10):
                raise Cancelled()
            raise ReceiveError("nobody cancelled")
        job.progress(1000, 1000)
        return Received(1000)


class CancellingReceiver(FakeReceiver):
    name = "fake"
    wait_for_cancel = True


def make_plan(device: str, **kw: Any) -> Plan:
    values: dict[str, Any] = {
        "deployment": 3,
        "node": "n 01",
        "image": ImageInfo("base:2", "0" * 64, 1000, 4 << 20, [], tree_bytes=100 * MiB, files=9),
        "transport": TransportInfo("fake"),
        "disk": Disk(
            device, "gpt", [Partition("/boot", "ext4", 100), Partition("/", "ext4", 0, True)]
        ),
        "identity": Identity(
            "n01",
            [Interface("eth0", "52:54:00:00:00:01", "10.0.0.5", "24", "10.0.0.1")],
            {"ssh_host_rsa_key": "PRIVATE", "ssh_host_rsa_key.pub": "ssh-rsa AAA"},
            ["ssh-ed25519 AAA admin"],
            None,
        ),
        "bootloader": "grub",
        "post_script": "echo hi\n",
        "report_interval": 0.01,
    }
    values.update(kw)
    return Plan(**values)


@pytest.fixture
def machine(tmp_path: Path) -> tuple[Path, Path]:
    """A "disk" (a plain file) and a work directory."""
    device = tmp_path / "dev" / "sda"
    device.parent.mkdir()
    device.write_bytes(b"")
    return device, tmp_path / "target"


def make_installer(
    plan: Plan,
    work: Path,
    runner: FakeRunner,
    client: FakeClient,
    receiver: type[Receiver] = FakeReceiver,
) -> Installer:
    settings = InstallSettings(work_dir=work, partition_timeout=0.1)
    return Installer(
        plan,
        cast(Client, client),
        runner,
        settings,
        receivers={"fake": receiver},
        sleep=lambda s: None,
        exists=os.path.exists,
    )


def test_installer_runs_the_phases_in_order(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    envs: list[Mapping[str, str] | None] = []
    runner.hook = lambda args, env: envs.append(env) if args[0] == "chroot" else None
    inst = make_installer(make_plan(str(device)), work, runner, client)
    final = inst.run()
    assert final.phase == "done", final.message
    assert inst.phases == [
        "partitioning",
        "receiving",
        "configuring",
        "bootloader",
        "post-install",
        "done",
    ]
    sent = [p["phase"] for p in client.posts]
    assert [p for i, p in enumerate(sent) if i == 0 or sent[i - 1] != p] == inst.phases
    assert set(client.paths) == {"/api/v1/deployments/3/nodes/n%2001/progress"}
    assert client.posts[-1]["bytes"] == 1000 and client.posts[-1]["total"] == 1000
    assert "phase post-install" in client.posts[-1]["log_tail"]
    d = str(device)
    assert runner.programs() == [
        "blockdev",
        "sfdisk",  # --json: is there a partition table corral did not make?
        "sfdisk",
        "mkfs.vfat",
        "mkfs.ext4",
        "mkfs.ext4",
        *["mount"] * 6,
        "chroot /usr/sbin/grub-install",
        "chroot /usr/sbin/grub-install",
        "chroot /usr/sbin/update-grub",
        "chroot /usr/bin/bash",
        "sync",
        *["umount"] * 6,
    ]
    (sync,) = [call for call in runner.calls if call[0] == "sync"]
    assert sync[:2] == ["sync", "-f"] and len(sync) == 5  # this disk's filesystems, not all
    assert runner.calls[2] == [
        "sfdisk",
        "--quiet",
        "--wipe",
        "always",
        "--wipe-partitions",
        "always",
        d,
    ]
    # grub on gpt: what BIOS and UEFI need, whichever this machine has
    assert "name=biosboot" in runner.inputs["sfdisk"] and "name=EFI" in runner.inputs["sfdisk"]
    assert runner.calls[6][-2:] == [f"{d}4", str(work)]
    assert runner.calls[7][-2:] == [f"{d}3", str(work / "boot")]
    assert runner.calls[8][-2:] == [f"{d}2", str(work / "boot/efi")]
    assert runner.calls[9] == ["mount", "-o", "bind", "/dev", str(work / "dev")]
    assert runner.calls[12] == [
        "chroot",
        str(work),
        "/usr/sbin/grub-install",
        "--target=i386-pc",
        d,
    ]
    assert runner.calls[13] == [
        "chroot",
        str(work),
        "/usr/sbin/grub-install",
        "--target=x86_64-efi",
        "--efi-directory=/boot/efi",
        "--removable",
        "--no-nvram",
    ]
    assert runner.calls[15] == [
        "chroot",
        str(work),
        "/usr/bin/bash",
        "/root/corral-post-install.sh",
    ]
    env = envs[-1]
    assert env is not None and env["CORRAL_NODE"] == "n 01" and env["HOME"] == "/root"
    umounted = [c[-1] for c in runner.calls if c[0] == "umount"]
    assert umounted == [str(work / p) for p in ("sys", "proc", "dev", "boot/efi", "boot")] + [
        str(work)
    ]
    assert not (work / "root/corral-post-install.sh").exists()
    assert (work / "etc/hostname").read_text() == "n01\n"
    stamp = json.loads((work / disk.STAMP).read_text())
    assert [v["mount"] for v in stamp["volumes"]] == ["biosboot", "/boot/efi", "/boot", "/"]


def test_grub_with_an_esp_on_uefi(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    parts = [Partition("/boot/efi", "efi", 100), Partition("/", "ext4", 0, True)]
    plan = make_plan(str(device), disk=Disk(str(device), "gpt", parts), post_script="")
    inst = make_installer(plan, work, runner, client)
    inst.settings.efi = True
    assert inst.run().phase == "done"
    grub = [c[2:] for c in runner.calls if c[0] == "chroot"]
    assert grub == [
        ["/usr/sbin/grub-install", "--target=i386-pc", str(device)],  # the same disk boots BIOS
        [
            "/usr/sbin/grub-install",
            "--target=x86_64-efi",
            "--efi-directory=/boot/efi",
            "--removable",
            "--no-nvram",
        ],
        ["/usr/sbin/update-grub"],
    ]
    assert inst.phases[-2:] == ["bootloader", "done"]


def test_a_disk_too_small_fails_before_writing(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(50 * MiB), FakeClient()
    final = make_installer(make_plan(str(device)), work, runner, client).run()
    assert final.phase == "failed"
    assert final.message.startswith(f"disk {device} is too small: 50 MiB, the layout needs 341 MiB")
    assert runner.programs() == ["blockdev"]
    assert client.posts[-1]["phase"] == "failed" and client.posts[-1]["message"] == final.message


def test_a_failing_mkfs_names_the_filesystem_and_unmounts(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    runner.fail["mkfs.ext4"] = (1, "mke2fs: Device or resource busy\nwhile setting up superblock")
    final = make_installer(make_plan(str(device)), work, runner, client).run()
    assert final.phase == "failed"
    assert final.message == (
        f"making the /boot filesystem on {device}3: mkfs.ext4 exited with 1: "
        "while setting up superblock"
    )
    assert "mount" not in runner.programs()


def test_a_failing_post_script(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()

    def post(args: list[str], env: Any) -> None:
        if args[0] == "chroot" and args[2].endswith("bash"):
            runner.fail["chroot"] = (2, "apt-get: command not found")

    runner.hook = post
    final = make_installer(make_plan(str(device)), work, runner, client).run()
    assert final.phase == "failed"
    assert final.message == "post-install script exited with 2: apt-get: command not found"
    assert runner.programs()[-5:] == ["umount"] * 5


def test_unknown_transport_or_bootloader_touch_nothing(machine: tuple[Path, Path]) -> None:
    device, work = machine
    for plan, message in (
        (make_plan(str(device), transport=TransportInfo("carrier-pigeon")), "unknown transport"),
        (make_plan(str(device), bootloader="lilo"), "unknown bootloader 'lilo'"),
        (make_plan(""), "no disk to install on"),
    ):
        runner = FakeRunner(8 << 30)
        final = make_installer(plan, work, runner, FakeClient()).run()
        assert final.phase == "failed" and message in final.message
        assert runner.calls == []


def test_cancel_stops_the_receiver_and_unmounts(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient(cancel_at="receiving")
    inst = make_installer(make_plan(str(device)), work, runner, client, CancellingReceiver)
    final = inst.run()
    assert (final.phase, final.message) == ("failed", "cancelled")
    assert inst.phases == ["partitioning", "receiving", "failed"]
    assert runner.programs()[-2:] == ["umount", "umount"]
    assert client.posts[-1]["message"] == "cancelled"


def test_cancel_stops_a_running_command(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    inst = make_installer(make_plan(str(device)), work, runner, client)

    def cancel_during_mkfs(args: list[str], env: Any) -> None:
        if args[0] == "mkfs.ext4":
            inst.cancel.set()

    runner.hook = cancel_during_mkfs
    final = inst.run()
    assert final.message == "cancelled"
    assert runner.programs().count("mkfs.ext4") == 1


class IncrementalReceiver(FakeReceiver):
    name = "fake"
    incremental = True


def table_json(layout: Layout, label_id: str | None = None) -> str:
    parts = [{"node": v.device, "start": 2048, "size": 2048} for v in layout.volumes]
    table = {"label": layout.label, "id": label_id or layout.label_id, "partitions": parts}
    return json.dumps({"partitiontable": table})


def test_an_incremental_receiver_keeps_the_filesystems_it_made(machine: tuple[Path, Path]) -> None:
    device, work = machine
    plan = make_plan(str(device), bootloader="none", post_script="")
    first_runner = FakeRunner(8 << 30)
    first = make_installer(plan, work, first_runner, FakeClient(), IncrementalReceiver)
    assert first.run().phase == "done" and not first.reused
    assert first.layout is not None
    # the fake mounts nothing: the stamp the first run wrote is where the next one looks
    runner = FakeRunner(8 << 30, outputs={"sfdisk": table_json(first.layout)})
    second = make_installer(plan, work, runner, FakeClient(), IncrementalReceiver)
    assert second.run().phase == "done"
    assert second.reused and second.layout == first.layout
    assert "mkfs.ext4" not in runner.programs()
    assert [c for c in runner.calls if c[0] == "sfdisk"] == [["sfdisk", "--json", str(device)]]
    # another partition table id: someone else partitioned the disk since
    runner = FakeRunner(8 << 30, outputs={"sfdisk": table_json(first.layout, "0xdeadbeef")})
    third = make_installer(plan, work, runner, FakeClient(), IncrementalReceiver)
    assert third.run().phase == "done" and not third.reused
    assert runner.programs().count("mkfs.ext4") == 2
    # another layout in the plan
    bigger = Disk(
        str(device), "gpt", [Partition("/boot", "ext4", 200), Partition("/", "ext4", 0, True)]
    )
    runner = FakeRunner(8 << 30, outputs={"sfdisk": table_json(first.layout)})
    fourth = make_installer(
        make_plan(str(device), disk=bigger, bootloader="none", post_script=""),
        work,
        runner,
        FakeClient(),
        IncrementalReceiver,
    )
    assert fourth.run().phase == "done" and not fourth.reused


def test_mount_waits_for_a_busy_device(tmp_path: Path) -> None:
    runner = FakeRunner(0)
    runner.answer(
        "mount", [(32, "mount: /t: /dev/sda1 already mounted or mount point busy."), (0, "")]
    )
    slept: list[float] = []
    mounts = disk.Mounts(runner, sleep=slept.append)
    mounts.mount("/dev/sda1", tmp_path / "t", fstype="ext4")
    assert len(runner.calls) == 2 and slept == [0.5] and mounts.stack == [str(tmp_path / "t")]
    runner.hook = None
    runner.fail["mount"] = (32, "mount: wrong fs type, bad option, bad superblock")
    with pytest.raises(disk.CommandFailed, match="mounting /dev/sdb1: mount exited with 32"):
        mounts.mount("/dev/sdb1", tmp_path / "u")
    assert len(runner.calls) == 3  # not busy: no second try


def test_partitioning_waits_for_a_disk_in_use_for_a_moment(tmp_path: Path) -> None:
    layout = layout_of([Partition("/", "ext4", 0, True)])
    in_use = "This disk is currently in use - repartitioning is probably a bad idea."
    runner = FakeRunner(0)
    runner.answer("sfdisk", [(1, in_use), (1, in_use), (0, "")])
    slept: list[float] = []
    disk.partition(
        runner, layout, 10 << 30, sleep=slept.append, exists=lambda d: True, sysfs=tmp_path
    )
    assert [c[0] for c in runner.calls].count("sfdisk") == 3 and slept == [0.5, 0.5]
    # in use for good (or for another reason): refused as before, never forced
    runner.hook = None
    runner.fail["sfdisk"] = (1, in_use)
    with pytest.raises(disk.CommandFailed, match="partitioning /dev/sda: sfdisk exited with 1"):
        disk.partition(
            runner, layout, 10 << 30, sleep=lambda s: None, exists=lambda d: True, sysfs=tmp_path
        )
    assert [c[0] for c in runner.calls].count("sfdisk") == 3 + disk.table.IN_USE_TRIES
    runner.fail["sfdisk"] = (1, "sfdisk: cannot open /dev/sda: No such device")
    with pytest.raises(disk.CommandFailed, match="No such device"):
        disk.partition(runner, layout, 10 << 30, sleep=lambda s: None, exists=lambda d: True)
    assert [c[0] for c in runner.calls].count("sfdisk") == 3 + disk.table.IN_USE_TRIES + 1
    assert not any("--force" in c for c in runner.calls)


def test_wait_partitions_nudges_the_kernel_until_the_new_table_shows(tmp_path: Path) -> None:
    layout = layout_of([Partition("/boot", "ext4", 100), Partition("/", "ext4", 0, True)])
    sysfs = tmp_path / "sys"
    for name, start, size in (("sda1", 2048, 100 * 2048), ("sda2", 999, 5)):  # sda2: the old one
        (sysfs / "class/block" / name).mkdir(parents=True)
        (sysfs / "class/block" / name / "start").write_text(f"{start}\n")
        (sysfs / "class/block" / name / "size").write_text(f"{size}\n")
    runner = FakeRunner(0)

    def partx(args: list[str], env: Any) -> None:
        if args[:2] == ["partx", "-a"]:  # the second nudge updates the kernel's view
            (sysfs / "class/block/sda2/start").write_text(f"{101 * 2048}\n")

    runner.hook = partx
    disk.wait_partitions(
        runner,
        layout,
        spans=disk.geometry(layout, 10 << 30),
        exists=lambda d: True,
        sleep=lambda s: None,
        sysfs=sysfs,
    )
    assert disk.geometry(layout, 10 << 30) == [(1, 100), (101, None)]
    assert runner.calls == [["partx", "-u", "/dev/sda"], ["partx", "-a", "/dev/sda"]]
    (sysfs / "class/block/sda2/start").write_text("7\n")
    with pytest.raises(DiskError, match=r"still has the old partitions of /dev/sda \(/dev/sda2\)"):
        disk.wait_partitions(
            FakeRunner(0),
            layout,
            spans=disk.geometry(layout, 10 << 30),
            exists=lambda d: True,
            sleep=lambda s: None,
            sysfs=sysfs,
            timeout=0.5,
        )


def test_an_unreachable_server_does_not_stop_the_install(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient(fail=True)
    assert make_installer(make_plan(str(device)), work, runner, client).run().phase == "done"


def test_reporter_sends_phase_changes_in_order_and_ticks() -> None:
    client = FakeClient()
    cancel = threading.Event()
    reporter = Reporter(cast(Client, client), "/p", 0.05, cancel)
    reporter.start()
    for phase in ("partitioning", "receiving"):
        reporter.update(Progress(phase), now=True)
    reporter.update(Progress("receiving", 10, 100))
    deadline = time.monotonic() + 10
    while not any(p["bytes"] == 10 for p in client.posts) and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.stop()
    phases = [p["phase"] for p in client.posts]
    assert phases[:2] == ["partitioning", "receiving"]
    assert {"bytes": 10, "total": 100}.items() <= client.posts[-1].items()
    assert not cancel.is_set()


def test_a_joined_session_is_told_once_and_not_resent_at_each_tick() -> None:
    """An event (the receiver joined its session) goes out next, once; the report sent
    at every interval stays the progress, without it."""
    client = FakeClient()
    reporter = Reporter(cast(Client, client), "/p", 0.05, threading.Event())
    reporter.update(Progress("receiving", 0, 100))
    reporter.start()
    reporter.tell(Progress("receiving", 0, 100, joined="7/img:1/abc"))
    deadline = time.monotonic() + 10
    while len(client.posts) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.stop()
    assert [p["joined"] for p in client.posts].count("7/img:1/abc") == 1
    assert client.posts[-1]["joined"] == ""


# --- identity --------------------------------------------------------------------------

IDENTITY = Identity(
    hostname="n01.lab",
    interfaces=[
        Interface("eth0", "52:54:00:AA:00:01", "10.1.0.5", "255.255.0.0", "10.1.0.1"),
        Interface("ib0", None, None, "", None),
    ],
    ssh_host_keys={"ssh_host_ed25519_key": "PRIV", "ssh_host_ed25519_key.pub": "PUB\n"},
    authorized_keys=["ssh-ed25519 AAA one", "  ", "ssh-rsa BBB two\n"],
    root_password_hash="$6$x$y",
)


def test_network_files() -> None:
    assert identity.networkd_files(IDENTITY) == {
        "10-corral-eth0.network": "# Written by corral for n01.lab: interface eth0.\n"
        "[Match]\nMACAddress=52:54:00:aa:00:01\n\n"
        "[Network]\nAddress=10.1.0.5/16\nGateway=10.1.0.1\n",
        "10-corral-ib0.network": "# Written by corral for n01.lab: interface ib0.\n"
        "[Match]\nName=ib0\n\n[Network]\nDHCP=ipv4\n",
    }
    assert identity.ifupdown_text(IDENTITY) == (
        "# Written by corral for n01.lab.\n"
        "source /etc/network/interfaces.d/*\n\n"
        "auto lo\niface lo inet loopback\n\n"
        "auto eth0\niface eth0 inet static\n    address 10.1.0.5/16\n    gateway 10.1.0.1\n\n"
        "auto ib0\niface ib0 inet dhcp\n"
    )
    nm = identity.networkmanager_files(IDENTITY)["corral-eth0.nmconnection"]
    assert "mac-address=52:54:00:AA:00:01" in nm and "address1=10.1.0.5/16" in nm
    assert identity.prefix_length("24") == 24
    with pytest.raises(identity.IdentityError, match="bad netmask"):
        identity.prefix_length("255.0.255.0")


def test_hosts_and_fstab() -> None:
    hosts = identity.hosts_text(IDENTITY)
    assert hosts.splitlines()[:2] == ["127.0.0.1\tlocalhost", "10.1.0.5\tn01.lab n01"]
    dhcp = Identity("n02", [], {}, [], None)
    assert "127.0.1.1\tn02" in identity.hosts_text(dhcp)
    layout = layout_of(STANDARD, bootloader="grub")
    u = {v.mount: v.uuid for v in layout.volumes}
    assert identity.fstab_text(layout.volumes).splitlines()[2:] == [
        f"UUID={u['/']}\t/\txfs\tdefaults\t0\t0",
        f"UUID={u['/boot']}\t/boot\text4\tdefaults\t0\t2",
        "UUID=ABCD-1234\t/boot/efi\tvfat\tumask=0077\t0\t2",
        f"UUID={u['swap']}\tnone\tswap\tsw\t0\t0",
    ]


def test_shadow() -> None:
    text = "root:*:19000:0:99999:7:::\nbin:*:19000::::::\n"
    assert identity.shadow_with_root_password(text, "$6$a$b", 20000) == (
        "root:$6$a$b:20000:0:99999:7:::\nbin:*:19000::::::\n"
    )
    assert identity.shadow_with_root_password("", "$6$a$b", 1) == "root:$6$a$b:1:0:99999:7:::\n"
    with pytest.raises(identity.IdentityError, match="contains ':'"):
        identity.shadow_with_root_password(text, "a:b", 1)


def test_configure_writes_every_file_with_its_mode(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/network").mkdir(parents=True)
    (root / "etc/network/interfaces").write_text("old\n")
    (root / "etc/hostname").symlink_to("/etc/elsewhere")  # replaced, not followed
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/systemd-networkd.service").write_text("[Unit]\n")
    written = identity.configure(root, IDENTITY, layout_of(STANDARD))
    assert (root / "etc/hostname").read_text() == "n01\n"
    assert not (root / "etc/hostname").is_symlink()
    assert "etc/network/interfaces" in written
    assert "iface eth0 inet static" in (root / "etc/network/interfaces").read_text()
    # ifupdown is there: networkd is not enabled besides it
    assert not (root / "etc/systemd/system/multi-user.target.wants").exists()

    def mode(rel: str) -> int:
        return stat.S_IMODE((root / rel).stat().st_mode)

    assert mode("etc/ssh/ssh_host_ed25519_key") == 0o600
    assert mode("etc/ssh/ssh_host_ed25519_key.pub") == 0o644
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_text() == "PRIV\n"
    assert mode("root/.ssh") == 0o700 and mode("root/.ssh/authorized_keys") == 0o600
    assert (root / "root/.ssh/authorized_keys").read_text() == (
        "ssh-ed25519 AAA one\nssh-rsa BBB two\n"
    )
    assert (root / "etc/shadow").read_text().startswith("root:$6$x$y:")
    assert mode("etc/shadow") == 0o640
    assert (root / "etc/machine-id").read_text() == "" and mode("etc/machine-id") == 0o444
    assert not list(root.rglob(".*.corral-tmp"))


def test_networkd_is_enabled_without_another_manager(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    for unit in ("systemd-networkd.service", "systemd-networkd.socket"):
        (root / "usr/lib/systemd/system" / unit).write_text("[Unit]\n")
    plain = Identity("n03", IDENTITY.interfaces, {}, [], None)
    identity.configure(root, plain, layout_of([Partition("/", "ext4", 10)]))
    link = root / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/systemd-networkd.service"
    assert (root / "etc/systemd/system/sockets.target.wants/systemd-networkd.socket").is_symlink()
    assert not (root / "root/.ssh").exists() and not (root / "etc/shadow").exists()


def test_bad_ssh_key_names_are_refused(tmp_path: Path) -> None:
    bad = Identity("n01", [], {"../../etc/passwd": "x"}, [], None)
    with pytest.raises(identity.IdentityError, match="bad SSH host key file name"):
        identity.write_ssh(tmp_path, bad)


# --- receivers -------------------------------------------------------------------------


def test_receivers_by_transport_name() -> None:
    assert receiver_class("http") is HttpReceiver
    assert receiver_class("rsync") is RsyncReceiver
    assert RsyncReceiver.incremental and not HttpReceiver.incremental
    with pytest.raises(ReceiveError, match=r"unknown transport 'udp': this agent has .*http"):
        receiver_class("udp")


def test_rsync_command_and_output() -> None:
    plan = make_plan("/dev/sda", transport=TransportInfo("rsync", {"url": "rsync://s:873/m"}))
    assert RsyncReceiver(Context(None)).argv(plan, Path("/t")) == [
        "rsync",
        "-aHAX",
        "--numeric-ids",
        "--delete",
        "--info=progress2",
        "--stats",
        "--filter=P /lost+found",
        "--filter=P /etc/corral/",
        "--filter=P /etc/corral/layout.json",
        "rsync://s:873/m/",
        "/t/",
    ]
    line = b"     12,345,678  42%   10.00MB/s    0:00:01 (xfr#3, to-chk=5/9)"
    assert parse_progress2(line) == 12345678
    assert parse_progress2(b"              0   0%    0.00kB/s    0:00:00") == 0
    assert parse_progress2(b"Number of files: 3 (reg: 1, dir: 2)") is None
    stats = parse_stats(
        "Number of files: 3\nNumber of regular files transferred: 1\n"
        "Total file size: 1,234 bytes\nLiteral data: 34 bytes\nMatched data: 0 bytes\n"
        "Number of deleted files: 2 (reg: 2)\n"
    )
    assert stats == {"files": 1, "size": 1234, "literal": 34, "matched": 0, "deleted": 2}


def chunk_plan(chunks: list[bytes]) -> Plan:
    info = ImageInfo(
        "base:1",
        hashlib.sha256(b"".join(chunks)).hexdigest(),
        sum(map(len, chunks)),
        4 << 20,
        [Chunk(hashlib.sha256(c).hexdigest(), len(c)) for c in chunks],
        tree_bytes=1,
        files=1,
    )
    return make_plan(
        "/dev/sda", image=info, transport=TransportInfo("http", {"base": "http://s/i/"})
    )


def test_a_chunk_is_fetched_again_and_resumed() -> None:
    chunks = [os.urandom(300_000), os.urandom(100_000)]
    server = ChunkServer(chunks, corrupt=[0], cut={1: 40_000})
    receiver = HttpReceiver(Context(None, tries=3))
    plan = chunk_plan(chunks)
    seen: list[int] = []
    event = threading.Event()
    for i in range(2):
        data = receiver.fetch_chunk(cast(Client, server), plan, i, seen.append, event)
        assert data == chunks[i]
    assert server.requests == [
        ("00000000.bin", 0),
        ("00000000.bin", 0),
        ("00000001.bin", 0),
        ("00000001.bin", 40_000),
    ]
    assert receiver.refetched == [0] and receiver.resumed == [(1, 40_000)]
    assert seen[-1] == 100_000


def test_a_chunk_that_never_matches_fails_naming_it() -> None:
    chunks = [os.urandom(1000)]
    server = ChunkServer(chunks, corrupt=[0, 0, 0])
    receiver = HttpReceiver(Context(None, tries=3))
    with pytest.raises(ReceiveError, match="chunk 00000000 of base:1 did not match its sha256"):
        receiver.fetch_chunk(
            cast(Client, server), chunk_plan(chunks), 0, lambda n: None, threading.Event()
        )


def test_a_cancel_stops_a_download() -> None:
    chunks = [os.urandom(1000)]
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        HttpReceiver(Context(None)).fetch_chunk(
            cast(Client, ChunkServer(chunks)), chunk_plan(chunks), 0, lambda n: None, event
        )


# --- the client's GET and downloads, on a real HTTP server ----------------------------


@pytest.fixture
def http() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    seen: list[dict[str, Any]] = []
    statuses: list[int] = []
    body = bytes(range(256)) * 40

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(
                {
                    "path": self.path,
                    "range": self.headers.get("Range"),
                    "auth": self.headers.get("Authorization"),
                }
            )
            status = statuses.pop(0) if statuses else 200
            if self.path.endswith("/plan"):
                answer = b"" if status == 204 else json.dumps({"ok": True}).encode()
            else:
                start = int((self.headers.get("Range") or "bytes=0-")[6:-1])
                answer = body[start:]
                status = 206 if start and status == 200 else status
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen, statuses
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_client_get_shows_204(http: tuple[str, list[dict[str, Any]], list[int]]) -> None:
    url, seen, statuses = http
    slept: list[float] = []
    client = Client(url, "tok", sleep=slept.append)
    statuses += [204, 503]
    assert client.get("/api/v1/nodes/n1/plan") == (204, None)
    assert client.get("/api/v1/nodes/n1/plan") == (200, {"ok": True})
    assert slept == [1.0] and seen[0]["auth"] == "Bearer tok"
    statuses.append(404)
    with pytest.raises(Rejected):
        client.get("/api/v1/nodes/n1/plan")


def test_client_download_with_a_range(http: tuple[str, list[dict[str, Any]], list[int]]) -> None:
    url, seen, _ = http
    client = Client(url, "tok", sleep=lambda s: None)
    with client.download(f"{url}/images/x/chunks/00000000.bin", start=1000) as answer:
        assert (answer.status, answer.offset) == (206, 1000)
        data = b""
        while piece := answer.read(4096):
            data += piece
        assert answer.complete
    assert data == (bytes(range(256)) * 40)[1000:]
    assert seen[-1]["range"] == "bytes=1000-" and seen[-1]["auth"] == "Bearer tok"
    with client.download("/relative/chunk.bin") as answer:
        size = 0
        while piece := answer.read(1 << 20):
            size += len(piece)
        assert (answer.offset, size) == (0, 10240)
    assert seen[-1]["path"] == "/relative/chunk.bin"


# --- the agent in deploy mode ----------------------------------------------------------


class PlanClient:
    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.answers = answers
        self.gets: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.server = "http://corral"

    def get(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        self.gets.append(path)
        return self.answers.pop(0) if self.answers else (204, None)

    def post(self, path: str, payload: dict[str, Any], *, auth: bool = True) -> Any:
        self.events.append({"path": path, **payload})
        return None


def plan_agent(tmp_path: Path, client: PlanClient, **settings: Any) -> tuple[Agent, list[float]]:
    slept: list[float] = []
    orders = BootOrders(server="http://corral", node="n01", mode="deploy")
    agent = Agent(orders, Paths(sysfs=tmp_path), Settings(**settings), sleep=slept.append)
    agent._client = cast(Client, client)
    return agent, slept


def test_the_agent_asks_for_its_plan_until_there_is_one(tmp_path: Path) -> None:
    """A corral that answers at once (one that does not hold requests): asked again
    every ``plan_poll`` seconds."""
    plan = make_plan("/dev/vda").to_dict()
    client = PlanClient([(204, None), (204, None), (200, plan)])
    agent, slept = plan_agent(tmp_path, client, plan_poll=3.0)
    got = agent.fetch_plan()
    assert got is not None and got.to_dict() == plan
    assert client.gets == ["/api/v1/nodes/n01/plan?wait=10"] * 3
    assert slept == [3.0, 3.0]


class HoldingClient(PlanClient):
    """A corral that holds each plan request for its ``?wait=`` seconds (of ``clock``)
    when it has no plan to give."""

    def __init__(self, answers: list[tuple[int, Any]], clock: list[float]) -> None:
        super().__init__(answers)
        self.clock = clock

    def get(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        status, body = super().get(path, auth=auth)
        if status == 204 and "?wait=" in path:
            self.clock[0] += float(path.rpartition("?wait=")[2])
        return status, body


def test_a_plan_request_corral_held_is_followed_by_the_next_at_once(tmp_path: Path) -> None:
    plan = make_plan("/dev/vda").to_dict()
    clock = [100.0]
    client = HoldingClient([(204, None), (204, None), (200, plan)], clock)
    agent, slept = plan_agent(tmp_path, client, plan_wait=8.0)
    agent.clock = lambda: clock[0]
    got = agent.fetch_plan()
    assert got is not None and got.to_dict() == plan
    assert client.gets == ["/api/v1/nodes/n01/plan?wait=8"] * 3
    assert slept == []  # corral's holding was the wait
    # the time held counts towards plan_timeout
    client = HoldingClient([], clock)
    agent, slept = plan_agent(tmp_path, client, plan_wait=8.0, plan_timeout=20.0)
    agent.clock = lambda: clock[0]
    assert agent.deploy() == 1
    assert len(client.gets) == 3 and slept == []
    assert client.events[-1]["message"] == "no install plan after 24 s"


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"plan_wait": 0.0}, "/api/v1/nodes/n01/plan"),
        # held no longer than the HTTP timeout allows, with room for the answer
        ({"plan_wait": 30.0, "http_timeout": 15.0}, "/api/v1/nodes/n01/plan?wait=10"),
        ({"plan_wait": 30.0, "http_timeout": 5.5}, "/api/v1/nodes/n01/plan"),
        ({"plan_wait": 2.5}, "/api/v1/nodes/n01/plan?wait=2.5"),
    ],
)
def test_how_long_corral_may_hold_a_plan_request(
    tmp_path: Path, settings: dict[str, float], path: str
) -> None:
    plan = make_plan("/dev/vda").to_dict()
    client = PlanClient([(204, None), (200, plan)])
    agent, slept = plan_agent(tmp_path, client, plan_poll=4.0, **settings)
    assert agent.fetch_plan() is not None
    assert client.gets == [path] * 2 and slept == [4.0]


def test_the_agent_gives_up_waiting_for_a_plan(tmp_path: Path) -> None:
    client = PlanClient([])
    agent, slept = plan_agent(tmp_path, client, plan_poll=5.0, plan_timeout=12.0)
    assert agent.deploy() == 1
    assert slept == [5.0, 5.0, 5.0]
    assert client.events[-1]["phase"] == "failed"
    assert client.events[-1]["message"] == "no install plan after 15 s"


def test_a_malformed_plan_is_reported(tmp_path: Path) -> None:
    client = PlanClient([(200, {"deployment": 1})])
    agent, _ = plan_agent(tmp_path, client)
    assert agent.fetch_plan() is None
    assert client.events[-1]["phase"] == "failed"
    assert "malformed plan" in client.events[-1]["message"]


def test_install_disk_and_interface_from_the_command_line(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    for name, removable in (("sdb", "1"), ("vda", "0")):
        (sysfs / "block" / name).mkdir(parents=True)
        (sysfs / "block" / name / "size").write_text("2048\n")
        (sysfs / "block" / name / "removable").write_text(removable + "\n")
    agent = Agent(BootOrders(), Paths(sysfs=sysfs))
    assert agent.install_disk() == "/dev/vda"
    agent = Agent(BootOrders(disk="/dev/nvme0n1"), Paths(sysfs=sysfs))
    assert agent.install_disk() == "/dev/nvme0n1"
    orders = BootOrders.from_cmdline("corral.disk=/dev/sdc corral.interface=veth0")
    assert (orders.disk, orders.interface) == ("/dev/sdc", "veth0")
    lo = Agent(BootOrders(interface="lo"), Paths(sysfs=sysfs))
    link = lo.network_up()
    assert (link.interface, link.ip) == ("lo", "127.0.0.1")
    assert Agent(BootOrders(interface="no-such-nic0"), Paths(sysfs=sysfs))._candidates() == []


def test_installed_kernel_args_reach_grubs_config(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    plan = make_plan(str(device), kernel_args=["console=ttyS0,115200", "quiet"])
    assert make_installer(plan, work, runner, client).run().phase == "done"
    text = (work / "etc/default/grub.d/50-corral.cfg").read_text()
    assert 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX console=ttyS0,115200 quiet"' in text
    assert Plan.from_dict(plan.to_dict()).kernel_args == ["console=ttyS0,115200", "quiet"]


FOREIGN_TABLE = json.dumps(
    {
        "partitiontable": {
            "label": "dos",
            "id": "0x1234",
            "device": "/dev/sda",
            "partitions": [
                {"node": "/dev/sda1", "start": 2048, "size": 1000, "type": "7"},
                {"node": "/dev/sda2", "start": 4096, "size": 1000, "type": "83"},
            ],
        }
    }
)


def test_a_disk_another_system_partitioned_is_not_erased_unless_told(
    machine: tuple[Path, Path],
) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    runner.outputs["sfdisk"] = FOREIGN_TABLE
    runner.fail["mount"] = (32, "wrong fs type")  # nothing corral reads on it
    final = make_installer(make_plan(str(device)), work, runner, client).run()
    assert final.phase == "failed"
    assert final.message == (
        f"{device} holds a dos partition table of 2 partition(s) (7, 83), not made by "
        "corral: not erased; set wipe_disk: true in the node's profile to let corral erase it"
    )
    assert "mkfs.ext4" not in runner.programs() and runner.programs().count("sfdisk") == 2
    # told to: erased, and the log says so
    runner, client = FakeRunner(8 << 30), FakeClient()
    runner.outputs["sfdisk"] = FOREIGN_TABLE
    plan = make_plan(str(device))
    wiping = dataclasses.replace(plan, disk=dataclasses.replace(plan.disk, wipe=True))
    installer = make_installer(wiping, work, runner, client)
    runner.fail["mount"] = (32, "wrong fs type")
    assert installer.run().phase == "failed"  # every mount fails here, the wipe went on
    assert "erasing" in client.posts[-1]["log_tail"] and "mkfs.ext4" in runner.programs()


def test_a_disk_corral_installed_is_partitioned_again(machine: tuple[Path, Path]) -> None:
    device, work = machine
    runner, client = FakeRunner(8 << 30), FakeClient()
    runner.outputs["sfdisk"] = FOREIGN_TABLE

    def stamp_on_first_mount(args: list[str], env: Any) -> None:
        if args[0] == "mount" and "ro" in args:
            (Path(args[-1]) / disk.STAMP).parent.mkdir(parents=True, exist_ok=True)
            (Path(args[-1]) / disk.STAMP).write_text("{}")

    runner.hook = stamp_on_first_mount
    final = make_installer(make_plan(str(device)), work, runner, client).run()
    assert final.phase == "done", final.message


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_rsync_keeps_the_mount_points_the_image_lacks(tmp_path: Path) -> None:
    """Re-deploying by rsync over a disk whose ESP is mounted at /boot/efi, a directory the
    image does not have: real rsync, with and without the mount points protected."""
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc/os-release").write_text("ID=test\n")
    target = tmp_path / "target"
    (target / "boot/efi").mkdir(parents=True)
    (target / "stale").write_text("from the last version\n")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target / "boot/efi")], check=True)
    try:
        (target / "boot/efi/BOOTX64.EFI").write_text("grub\n")
        plan = make_plan("/dev/sda", transport=TransportInfo("rsync", {"url": str(image)}))
        kept = RsyncReceiver(Context(None, mount_points=("/boot/efi",))).argv(plan, target)
        assert "--filter=P /boot/efi" in kept
        result = subprocess.run(kept, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert not (target / "stale").exists()
        assert (target / "boot/efi/BOOTX64.EFI").read_text() == "grub\n"
        bare = RsyncReceiver(Context(None)).argv(plan, target)
        assert subprocess.run(bare, capture_output=True, check=False).returncode == 23  # EBUSY
    finally:
        subprocess.run(["umount", str(target / "boot/efi")], check=True)
