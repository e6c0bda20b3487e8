"""Diskless boots around their tools: the agent's :class:`DisklessBoot` with a fake machine
(commands recorded, a receiver that writes the squashfs file), and the server's rules
(settings from the profile, the RAM check, the machine-id). The real boot is proven in
tests/integration/test_diskless_testbed.py and tests/vm/test_diskless.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import pytest

from corral.agent.deploy import InstallSettings
from corral.agent.diskless import DisklessBoot, machine_id, mount_unit
from corral.agent.plan import Diskless, Plan
from corral.agent.receivers.base import Job, Received, Receiver
from corral.deploy import diskless
from corral.inventory.merge import Merged
from tests.unit.test_agent_deploy import FakeClient, FakeRunner, make_plan

MiB = 1 << 20


class SquashfsReceiver(Receiver):
    """Writes the "squashfs" where the job says, as the stream receivers do."""

    name = "fake"
    seen: ClassVar[list[Job]] = []

    def receive(self, job: Job) -> Received:
        assert job.into_file is not None
        job.into_file.write_bytes(b"hsqs" + bytes(996))
        job.progress(1000, 1000)
        SquashfsReceiver.seen.append(job)
        return Received(1000)


def diskless_plan(**kw: Any) -> Plan:
    plan = make_plan("", post_script=kw.pop("post_script", ""))
    identity = dataclasses.replace(plan.identity, machine_id="0123456789abcdef0123456789abcdef")
    return dataclasses.replace(
        plan, mode="diskless", diskless=Diskless(**kw), identity=identity, bootloader="none"
    )


def boot(tmp_path: Path, plan: Plan, runner: FakeRunner) -> tuple[DisklessBoot, str]:
    settings = InstallSettings(work_dir=tmp_path / "newroot", disk=plan.diskless.device or None)  # type: ignore[union-attr]
    booter = DisklessBoot(
        plan,
        FakeClient(),  # type: ignore[arg-type]
        runner,
        settings,
        receivers={"fake": SquashfsReceiver},
        sleep=lambda _: None,
        run_dir=tmp_path / "run",
    )
    return booter, booter.run().phase


def mounts(runner: FakeRunner) -> list[tuple[str, ...]]:
    """(type, options, source) of each mount, in order."""
    out = []
    for call in runner.calls:
        if call[0] == "mount":
            kind = call[call.index("-t") + 1] if "-t" in call else ""
            options = call[call.index("-o") + 1] if "-o" in call else ""
            out.append((kind, options.split(",")[0], Path(call[-2]).name))
    return out


def test_the_squashfs_goes_into_a_tmpfs_under_an_overlay_that_stays_mounted(
    tmp_path: Path,
) -> None:
    runner = FakeRunner(0)
    booter, phase = boot(tmp_path, diskless_plan(overlay_size="2048"), runner)
    assert phase == "done"
    job = SquashfsReceiver.seen[-1]
    assert job.into_file == tmp_path / "run/diskless/image/image.squashfs"
    assert mounts(runner) == [
        ("tmpfs", "size=" + str(1000 + 16 * MiB), "corral-image"),
        ("squashfs", "loop", "image.squashfs"),
        ("tmpfs", "size=2048m", "corral-overlay"),
        ("overlay", f"lowerdir={tmp_path}/run/diskless/lower", "overlay"),
    ]
    assert not [c for c in runner.calls if c[0] == "umount"]  # left for /init
    root = tmp_path / "newroot"
    assert (root / "etc/hostname").read_text() == "n01\n"
    assert (root / "etc/machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert "UUID=" not in (root / "etc/fstab").read_text()
    assert booter.phases == ["receiving", "configuring", "done"]


def test_a_failed_boot_unmounts_everything(tmp_path: Path) -> None:
    runner = FakeRunner(0, fail={"cp": (1, "no space")})
    runner.outputs["blkid"] = "/dev/sdb1\n"
    (tmp_path / "newroot/var/log").mkdir(parents=True)
    _, phase = boot(tmp_path, diskless_plan(persistent=["/var/log"]), runner)
    assert phase == "failed"
    mounted = [c for c in runner.calls if c[0] == "mount"]
    unmounted = [c for c in runner.calls if c[0] == "umount"]
    assert len(unmounted) == len(mounted) > 0


def test_persistent_paths_come_from_the_partition_found_by_its_label(tmp_path: Path) -> None:
    runner = FakeRunner(0)
    runner.outputs["blkid"] = "/dev/sdb1\n"
    _, phase = boot(tmp_path, diskless_plan(persistent=["/var/log", "/scratch"]), runner)
    assert phase == "done"
    assert ["blkid", "-L", "corral-state"] in runner.calls
    binds = [(Path(c[-2]).name, c[-1]) for c in runner.calls if c[:3] == ["mount", "-o", "bind"]]
    root = tmp_path / "newroot"
    assert binds == [
        ("state", str(root / "var/lib/corral-state")),
        ("log", str(root / "var/log")),
        ("scratch", str(root / "scratch")),
    ]
    assert not [c for c in runner.calls if c[0] in ("sfdisk", "mkfs.ext4")]  # found, kept


def test_the_running_system_leaves_what_the_ramdisk_mounted_to_the_end(tmp_path: Path) -> None:
    """Each mount the root keeps has a unit file in the new root, without the default
    dependencies by which a reboot would try (and fail) to unmount it among the units."""
    runner = FakeRunner(0)
    runner.outputs["blkid"] = "/dev/sdb1\n"
    _, phase = boot(tmp_path, diskless_plan(persistent=["/var/log", "/my data"]), runner)
    assert phase == "done"
    systemd = tmp_path / "newroot/etc/systemd/system"
    units = {p.name: p.read_text() for p in systemd.glob("*.mount")}
    run = tmp_path / "run/diskless"  # where /run/corral/diskless is on a node
    made = {mount_unit(str(run / d)) for d in ("image", "lower", "overlay", "state")}
    assert set(units) == made | {
        "var-lib-corral\\x2dstate.mount",
        "var-log.mount",
        "my\\x20data.mount",
    }
    for text in units.values():
        assert "[Unit]\nDefaultDependencies=no\n" in text
    assert units["var-log.mount"].endswith(
        f"What={run}/state/var/log\nWhere=/var/log\nType=none\nOptions=bind\n"
    )
    assert (
        f"\nWhere={run}/overlay\nType=tmpfs\nOptions=size=25%%,mode=0755\n"
        in units[mount_unit(str(run / "overlay"))]
    )
    assert "\nWhat=/dev/sdb1\n" in units[mount_unit(str(run / "state"))]
    assert "\nWhere=/my data\n" in units["my\\x20data.mount"]


@pytest.mark.parametrize(
    ("path", "unit"),
    [  # as systemd-escape --path --suffix=mount gives them
        ("/run/corral/diskless/image", "run-corral-diskless-image.mount"),
        ("/var/lib/corral-state", "var-lib-corral\\x2dstate.mount"),
        ("/my data/.hidden/", "my\\x20data-.hidden.mount"),
        ("/.snapshots", "\\x2esnapshots.mount"),
        ("/srv/café", "srv-caf\\xc3\\xa9.mount"),
        ("/", "-.mount"),
    ],
)
def test_mount_units_are_named_as_systemd_names_them(path: str, unit: str) -> None:
    assert mount_unit(path) == unit


def test_a_disk_holding_something_else_is_never_formatted_unless_the_profile_says(
    tmp_path: Path,
) -> None:
    runner = FakeRunner(0, fail={"blkid": (2, "")})
    runner.outputs["sfdisk"] = '{"partitiontable": {"label": "dos", "partitions": []}}'

    def xfs(args: list[str], env: object) -> None:
        if args[:2] == ["blkid", "-p"]:
            runner.fail.pop("blkid", None)
            runner.outputs["blkid"] = "xfs\n"

    runner.hook = xfs
    plan = diskless_plan(persistent=["/var/log"], device="/dev/sdb")
    booter, phase = boot(tmp_path, plan, runner)
    assert phase == "failed"
    message = booter.client.posts[-1]["message"]  # type: ignore[union-attr]
    assert message == (
        "/dev/sdb holds a file system of type xfs, and no partition labelled corral-state: not "
        "erased; set wipe_disk: true in the node's profile to let corral make one there"
    )
    assert not [c for c in runner.calls if c[0] in ("sfdisk", "mkfs.ext4") and "--json" not in c]


def test_no_disk_for_persistent_paths_is_a_reason(tmp_path: Path) -> None:
    runner = FakeRunner(0, fail={"blkid": (2, "")})
    booter, phase = boot(tmp_path, diskless_plan(persistent=["/var/log"]), runner)
    assert phase == "failed"
    posts = booter.client.posts  # type: ignore[union-attr]
    assert "need a disk, and this node has none" in posts[-1]["message"]


def test_the_machine_id_is_the_nodes_at_every_boot() -> None:
    first = machine_id("n001", "ssh-ed25519 AAAA")
    assert first == machine_id("n001", "ssh-ed25519 AAAA") and len(first) == 32
    assert first != machine_id("n002", "ssh-ed25519 AAAA")
    int(first, 16)


def merged(variables: dict[str, Any]) -> Merged:
    return Merged(chain=[], values={"variables": variables})


def test_settings_come_from_the_profile_with_defaults() -> None:
    assert diskless.settings_of(merged({})) == Diskless()
    got = diskless.settings_of(
        merged({"overlay_size": 4096, "persistent_paths": "/var/log /scratch", "wipe_disk": True})
    )
    assert got == Diskless(overlay_size="4096", persistent=["/var/log", "/scratch"], wipe=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Diskless(overlay_size="lots"), "overlay_size 'lots' is not a size"),
        (Diskless(persistent=["var/log"]), "persistent path 'var/log'"),
        (Diskless(persistent=["/"]), "persistent path '/'"),
        (Diskless(persistent=["/var/../etc"]), "persistent path '/var/../etc'"),
    ],
)
def test_bad_settings_are_refused(settings: Diskless, message: str) -> None:
    with pytest.raises(diskless.DisklessError, match=message):
        diskless.check_settings("n1", settings)


def test_ram_is_checked_with_figures() -> None:
    assert diskless.overlay_bytes("25%", 4096) == 1024 * MiB
    assert diskless.overlay_bytes("512", 4096) == 512 * MiB
    diskless.check_memory("n1", None, 900 * MiB, "25%")  # unknown RAM: let through
    diskless.check_memory("n1", {"memory_mb": 4096}, 900 * MiB, "25%")
    with pytest.raises(diskless.DisklessError) as err:
        diskless.check_memory("n1", {"memory_mb": 1024}, 900 * MiB, "25%")
    assert err.value.message == (
        "node n1: 1024 MiB of RAM cannot hold the image's squashfs (900 MiB), the overlay "
        "(256 MiB, overlay_size 25%) and the system (384 MiB): 1540 MiB needed"
    )
