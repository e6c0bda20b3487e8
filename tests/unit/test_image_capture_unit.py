"""Image capture without a node: the commands as data (rsync, ssh, excludes), what the node's
mount table and swap list select, error explanations, rsync's output, and whole captures
against a fake ssh and a fake rsync (the real thing: tests/integration/test_image_capture.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from corral.images import capture as capture_mod
from corral.images.build.errors import DiskFull
from corral.images.capture import capture
from corral.images.capture.errors import CaptureError, SourceError
from corral.images.capture.probe import (
    disk_mounts,
    parse_mountinfo,
    probe,
    probe_command,
    swap_excludes,
)
from corral.images.capture.rsync import (
    DEFAULT_EXCLUDES,
    Progress,
    RsyncOutcome,
    check_rsync_outcome,
    excludes_for,
    parse_progress,
    rsync_argv,
    run_rsync,
)
from corral.images.capture.source import Source, explain_ssh, is_address, node_address, ssh_argv
from corral.images.store import ImageStore
from corral.inventory.schema import NodeSpec

KNOWN = Path("/var/lib/corral/ssh/known_hosts")
SSH = [
    "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
    "-o", "ServerAliveCountMax=4", "-o", "StrictHostKeyChecking=accept-new",
    "-o", "LogLevel=ERROR",
]  # fmt: skip


def source(**changes: object) -> Source:
    fields: dict[str, object] = {"host": "10.0.0.5", "known_hosts": KNOWN}
    fields.update(changes)
    return Source(**fields)  # type: ignore[arg-type]


# --- commands as data ------------------------------------------------------------------


def test_ssh_options() -> None:
    assert ssh_argv(source()) == [*SSH, "-o", f"UserKnownHostsFile={KNOWN}", "-p", "22"]
    keyed = ssh_argv(source(key=Path("/root/keys/golden key"), port=2222, known_hosts=None))
    assert keyed == [
        *SSH, "-p", "2222", "-i", "/root/keys/golden key", "-o", "IdentitiesOnly=yes",
    ]  # fmt: skip


def test_rsync_command() -> None:
    src = source(key=Path("/root/keys/golden key"), port=2222)
    argv = rsync_argv(src, Path("/store/.tmp/x/rootfs"), ["/proc/*", "/etc/machine-id"], ["boot"])
    assert argv == [
        "rsync", "-aHAXxR", "--numeric-ids", "--sparse", "--delete", "--delete-excluded",
        "--no-inc-recursive", "--info=progress2", "--stats",
        "-e",
        "ssh -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15"
        " -o ServerAliveCountMax=4 -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR"
        " -o UserKnownHostsFile=/var/lib/corral/ssh/known_hosts -p 2222"
        " -i '/root/keys/golden key' -o IdentitiesOnly=yes",
        "--exclude=/proc/*", "--exclude=/etc/machine-id",
        "root@10.0.0.5:/./", "root@10.0.0.5:/./boot",
        "/store/.tmp/x/rootfs/",
    ]  # fmt: skip
    # rsync splits -e on blanks and honours shell-style quotes: the key path survives.
    assert shlex.split(argv[10]) == ssh_argv(src)


def test_rsync_sources_keep_their_place() -> None:
    src = source(host="fd00::5", user="admin", path="/mnt/disk/")
    assert src.path == "/mnt/disk"
    assert src.rsync_source() == "admin@[fd00::5]:/mnt/disk/./"
    assert src.rsync_source("boot/efi") == "admin@[fd00::5]:/mnt/disk/./boot/efi"
    assert source(path="/srv//golden/./").path == "/srv/golden"


def test_default_excludes() -> None:
    patterns = excludes_for(["/home/*", "*.core", "/proc/*"], ["/swap/file1"])
    assert patterns[: len(DEFAULT_EXCLUDES)] == list(DEFAULT_EXCLUDES)
    assert patterns[len(DEFAULT_EXCLUDES) :] == ["/swap/file1", "/home/*", "*.core"]  # once each
    for pattern in (
        "/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/var/tmp/*", "/mnt/*", "/media/*",
        "/lost+found", "/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/ssh/ssh_host_*",
        "/var/log/journal/*", "/var/cache/apt/archives/*.deb", "/swapfile",
    ):  # fmt: skip
        assert pattern in patterns
    # Mount points keep their directory: their contents go, never the directory itself.
    assert "/proc" not in patterns and "/tmp" not in patterns
    with pytest.raises(SourceError, match="invalid exclude pattern"):
        excludes_for([" "])


def test_probe_command_quotes_the_path() -> None:
    command = probe_command(source(path="/mnt/a disk"))
    assert "test -d '/mnt/a disk' || exit 98" in command
    assert command.startswith("command -v rsync >/dev/null 2>&1 || exit 97; ")


def test_source_validation() -> None:
    with pytest.raises(SourceError, match="invalid host 'root@node1'") as caught:
        source(host="root@node1")
    assert caught.value.hint is not None and "--user" in caught.value.hint
    assert caught.value.exit_code == 2
    for bad in ("-oProxyCommand=x", "a b", ""):
        with pytest.raises(SourceError, match="invalid host"):
            source(host=bad)
    with pytest.raises(SourceError, match="invalid SSH port 0"):
        source(port=0)
    with pytest.raises(SourceError, match="invalid source path"):
        source(path="relative/dir")
    with pytest.raises(SourceError, match="invalid user name"):
        source(user="-l")
    assert source(host="golden01.cluster.local").where == "root@golden01.cluster.local"
    assert source(port=2222).where == "root@10.0.0.5 port 2222"


def test_node_address() -> None:
    node = NodeSpec.model_validate(
        {"name": "n1", "interfaces": [{"name": "eth0"}, {"name": "ib0", "ip": "10.0.0.5"}]}
    )
    assert node_address(node) == "10.0.0.5"
    with pytest.raises(SourceError, match="node 'n2' has no IP address") as caught:
        node_address(NodeSpec.model_validate({"name": "n2", "interfaces": [{"name": "eth0"}]}))
    assert caught.value.hint is not None and "corral node set n2 --ip" in caught.value.hint
    assert is_address("10.0.0.5") and is_address("fd00::5") and not is_address("node1")


# --- what the node says ----------------------------------------------------------------

MOUNTINFO = """\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
23 28 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
24 28 0:5 / /dev rw,nosuid,relatime shared:8 - devtmpfs udev rw,size=4008000k
25 24 0:23 / /dev/shm rw,nosuid,nodev shared:9 - tmpfs tmpfs rw
26 28 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=804000k
28 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
30 28 254:2 / /boot rw,relatime shared:15 - ext4 /dev/vda2 rw
31 30 254:3 / /boot/efi rw,relatime shared:16 - vfat /dev/vda3 rw,fmask=0077,dmask=0077
32 28 0:40 /@var /var rw,relatime shared:17 - btrfs /dev/vdb rw,subvol=/@var
33 28 0:40 /@home /home rw,relatime shared:18 - btrfs /dev/vdb rw,subvol=/@home
34 33 0:50 / /home/shared rw,relatime shared:19 - nfs4 nas:/export rw,vers=4.2
35 34 254:4 / /home/shared/local rw,relatime shared:20 - ext4 /dev/vdc rw
36 28 7:0 / /snap/core22/1380 ro,nodev,relatime shared:21 - squashfs /dev/loop0 ro
37 26 254:1 /run/netns /run/netns rw,relatime shared:22 - ext4 /dev/vda1 rw
38 28 254:1 /srv/www /var/www rw,relatime shared:23 - ext4 /dev/vda1 rw
39 28 254:5 / /data\\040disk rw,relatime shared:24 - xfs /dev/vdd rw
40 28 254:6 / /scratch rw,relatime shared:25 - ext4 /dev/vde rw
41 28 0:60 / /scratch rw,relatime shared:26 - tmpfs tmpfs rw
42 32 0:40 /@var/lib/docker /var/lib/docker rw,relatime shared:27 - btrfs /dev/vdb rw
"""


def test_disk_mounts_from_the_root() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[15].target == "/data disk" and mounts[15].fstype == "xfs"
    # /boot and /boot/efi (their own disks), both btrfs subvolumes, the xfs disk; not the
    # tmpfs, nfs (nor the ext4 below it), squashfs, the tmpfs over /scratch, or the binds
    # of directories already copied (/var/www from /, /var/lib/docker from /@var).
    assert disk_mounts(mounts, "/") == ["boot", "var", "home", "data disk", "boot/efi"]


def test_disk_mounts_below_a_source_path() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert disk_mounts(mounts, "/boot") == ["efi"]
    assert disk_mounts(mounts, "/home") == []  # shared is nfs
    assert disk_mounts(mounts, "/srv/golden") == []
    assert disk_mounts([], "/") == []


def test_swap_excludes() -> None:
    swaps = (
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/swap.img                               file\t\t2097148\t\t0\t\t-2\n"
        "/dev/vda5                               partition\t1000000\t\t0\t\t-3\n"
        "/var/swap\\040[1]                        file\t\t1024\t\t0\t\t-4\n"
    )
    assert swap_excludes(swaps, "/") == ["/swap.img", "/var/swap \\[1]"]
    assert swap_excludes(swaps, "/var") == ["/swap \\[1]"]
    assert swap_excludes("", "/") == []


def fake_ssh(returncode: int, stdout: str = "", stderr: str = "") -> object:
    calls: list[list[str]] = []

    def runner(
        argv: Sequence[str],
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), returncode, stdout, stderr)

    runner.calls = calls  # type: ignore[attr-defined]
    return runner


def probe_output(mountinfo: str = MOUNTINFO, swaps: str = "") -> str:
    return f"golden01\n@@corral-capture@@\n{mountinfo}@@corral-capture@@\n{swaps}"


def test_probe_reads_the_node() -> None:
    runner = fake_ssh(0, probe_output(swaps="Filename Type\n/swapfile file 1 0 -2\n"))
    found = probe(source(), runner)  # type: ignore[arg-type]
    assert found.hostname == "golden01"
    assert found.mounts == ["boot", "var", "home", "data disk", "boot/efi"]
    assert found.swap_excludes == ["/swapfile"]
    argv = runner.calls[0]  # type: ignore[attr-defined]
    assert argv[: len(SSH)] == SSH
    assert argv[-4:-1] == ["-l", "root", "10.0.0.5"]
    assert argv[-1] == probe_command(source())


@pytest.mark.parametrize(
    ("code", "stderr", "message", "hint"),
    [
        (255, "ssh: connect to host 10.0.0.5 port 22: Connection refused", "connection refused",
         "--ssh-port"),
        (255, "ssh: connect to host 10.0.0.5 port 22: No route to host", "no route to host",
         "ping 10.0.0.5"),
        (255, "ssh: connect to host 10.0.0.5 port 22: Connection timed out",
         "connection timed out", "is up"),
        (255, "root@10.0.0.5: Permission denied (publickey).", "refused the login",
         "--ssh-key"),
        (255, "ssh: Could not resolve hostname ghost: Name or service not known",
         "unknown host", "corral node list"),
        (97, "", "rsync is not installed on 10.0.0.5", "apt-get install rsync"),
        (98, "", "no directory / on 10.0.0.5", "--source-path"),
        (2, "sh: syntax error", "the check on the node failed (exit code 2): sh: syntax error",
         "POSIX shell"),
    ],
)  # fmt: skip
def test_probe_failures_are_one_line(code: int, stderr: str, message: str, hint: str) -> None:
    with pytest.raises(SourceError) as caught:
        probe(source(), fake_ssh(code, "", stderr))  # type: ignore[arg-type]
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.hint is not None and hint in caught.value.hint
    assert caught.value.exit_code == 2


def test_changed_host_key_names_the_fix() -> None:
    stderr = (
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
        "Host key verification failed.\n"
    )
    error = explain_ssh(stderr, source(port=2222))
    assert "host key is not the one seen before" in str(error)
    assert error.hint == (
        f"if the node was reinstalled, forget the old key: ssh-keygen -R '[10.0.0.5]:2222' "
        f"-f {KNOWN}"
    )


def test_unknown_inventory_host_says_which() -> None:
    stderr = "ssh: Could not resolve hostname n1: Temporary failure in name resolution"
    error = explain_ssh(stderr, source(host="n1", node="n1"))
    assert error.hint is not None and "address in the inventory" in error.hint


# --- rsync's output --------------------------------------------------------------------


def test_parse_progress() -> None:
    assert parse_progress("              5  71%    0.00kB/s    0:00:00  ") == Progress(
        5, 71, "0.00kB/s"
    )
    line = "  1,234,567,890  45%   12.34MB/s    0:01:05 (xfr#1203, to-chk=9876/54321)"
    assert parse_progress(line) == Progress(1234567890, 45, "12.34MB/s", 9876, 54321)
    line = "      1,024   0%  100.00kB/s    0:00:00 (xfr#1, ir-chk=1000/1200)"
    assert parse_progress(line) == Progress(1024, 0, "100.00kB/s", 1000, 1200)
    assert parse_progress("Number of files: 12 (reg: 9, dir: 3)") is None
    assert parse_progress("") is None


def test_run_rsync_streams_progress_and_reads_stats(tmp_path: Path) -> None:
    script = (
        "printf '      1,000  10%%    1.00MB/s    0:00:01\\r'; "
        "printf '      2,000 100%%    2.00MB/s    0:00:00 (xfr#2, to-chk=0/5)\\n'; "
        "printf 'Number of regular files transferred: 2\\nTotal bytes received: 3,456\\n'; "
        "echo 'file has vanished: \"/var/log/x\"' >&2; exit 24"
    )
    seen: list[Progress] = []
    outcome = run_rsync(["sh", "-c", script], env={}, on_progress=seen.append)
    assert [p.percent for p in seen] == [10, 100]
    assert outcome.returncode == 24
    assert outcome.received_bytes == 3456 and outcome.files_transferred == 2
    assert outcome.last == seen[-1]
    assert "file has vanished" in outcome.stderr


def test_rsync_failures() -> None:
    src = source()
    store = ImageStore(Path("/store"))
    check_rsync_outcome(RsyncOutcome(0), src, store)
    check_rsync_outcome(RsyncOutcome(24, 'file has vanished: "/var/log/x"'), src, store)
    stderr = 'rsync: [sender] send_files failed to open "/srv/x": Permission denied (13)\n'
    with pytest.raises(CaptureError, match=r"some files could not be copied \(exit code 23\)"):
        check_rsync_outcome(RsyncOutcome(23, stderr), src, store)
    lost = "client_loop: send disconnect: Broken pipe\nrsync: connection unexpectedly closed"
    with pytest.raises(CaptureError, match=r"ssh failed: .*\(during the copy\)") as caught:
        check_rsync_outcome(RsyncOutcome(255, lost), src, store)
    assert caught.value.exit_code == 1
    full = 'rsync: [receiver] write failed on "/store/x": No space left on device (28)'
    with pytest.raises(DiskFull):
        check_rsync_outcome(RsyncOutcome(11, full), src, store)


# --- whole captures against fakes ------------------------------------------------------


class FakeRsync:
    """Stands in for run_rsync: writes a node's tree into the destination (last argument),
    as rsync with the default excludes would, or fails the way it is told to."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.seeded: list[list[str]] = []
        self.fail: RsyncOutcome | None = None
        self.interrupt = False
        self.motd = "welcome\n"

    def __call__(
        self, argv: Sequence[str], *, env: dict[str, str], on_progress: object
    ) -> RsyncOutcome:
        self.calls.append(list(argv))
        dest = Path(argv[-1])
        self.seeded.append(sorted(str(p.relative_to(dest)) for p in dest.rglob("*")))
        for d in ("etc/ssh", "proc", "tmp", "var/lib/dbus"):
            (dest / d).mkdir(parents=True, exist_ok=True)
        (dest / "etc/motd").write_text(self.motd)
        (dest / "etc/hostname").write_text("golden01\n")
        if callable(on_progress):
            on_progress(Progress(10, 100, "1.00kB/s", 0, 7))
        if self.interrupt:
            raise KeyboardInterrupt
        if self.fail is not None:
            return self.fail
        return RsyncOutcome(0, received_bytes=1234, files_transferred=2)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def run_capture(store: ImageStore, rsync: FakeRsync, **changes: object) -> object:
    fields: dict[str, object] = {"known_hosts": store.root.parent / "ssh/known_hosts"}
    fields.update(changes)
    return capture(
        store,
        "golden",
        source(**fields),
        ["/home/*"],
        runner=fake_ssh(0, probe_output()),  # type: ignore[arg-type]
        transfer=rsync,
    )


def test_capture_adds_a_version_with_its_record(store: ImageStore) -> None:
    rsync = FakeRsync()
    steps: list[str] = []
    result = capture(
        store,
        "golden",
        source(known_hosts=store.root.parent / "ssh/known_hosts", node="golden01"),
        ["/home/*"],
        on_step=steps.append,
        runner=fake_ssh(0, probe_output()),  # type: ignore[arg-type]
        transfer=rsync,
    )
    version = result.version
    assert version.ref == "golden:1"
    assert result.received_bytes == 1234 and result.seeded_from is None
    assert result.filesystems == ["/", "/boot", "/var", "/home", "/data disk", "/boot/efi"]
    argv = rsync.calls[0]
    assert argv[-7:-1] == [
        "root@10.0.0.5:/./", "root@10.0.0.5:/./boot", "root@10.0.0.5:/./var",
        "root@10.0.0.5:/./home", "root@10.0.0.5:/./data disk", "root@10.0.0.5:/./boot/efi",
    ]  # fmt: skip
    assert "--exclude=/home/*" in argv and "--exclude=/boot/lost+found" in argv
    assert rsync.seeded == [[]]  # the first capture starts from an empty tree
    # No identity, as every tree that enters the store.
    assert (version.rootfs / "etc/machine-id").read_text() == ""
    assert (version.rootfs / "etc/hostname").read_text() == "localhost\n"
    assert os.readlink(version.rootfs / "var/lib/dbus/machine-id") == "/etc/machine-id"
    manifest = json.loads((version.path / "manifest.json").read_text())
    assert manifest == version.manifest
    assert manifest["origin"] == "capture root@10.0.0.5:/"
    record = manifest["capture"]
    assert record["node"] == "golden01" and record["host"] == "10.0.0.5"
    assert record["hostname"] == "golden01"
    assert record["excludes"][-1] == "/home/*"
    assert record["received_bytes"] == 1234 and record["vanished_files"] is False
    assert steps == ["connecting", "copying", "adding the version"]
    assert (store.root.parent / "ssh").stat().st_mode & 0o777 == 0o700
    assert list((store.root / ".tmp").iterdir()) == []


def test_recapture_starts_from_the_last_version(store: ImageStore) -> None:
    rsync = FakeRsync()
    run_capture(store, rsync)
    rsync.motd = "changed\n"
    result = run_capture(store, rsync)
    assert result.version.ref == "golden:2"  # type: ignore[attr-defined]
    assert "etc/motd" in rsync.seeded[1]  # rsync only had to send the changes
    assert result.seeded_from == "golden:1"  # type: ignore[attr-defined]
    assert (store.get("golden", 1).rootfs / "etc/motd").read_text() == "welcome\n"
    assert (store.get("golden", 2).rootfs / "etc/motd").read_text() == "changed\n"
    assert store.get("golden", 2).manifest["capture"]["seeded_from"] == "golden:1"


@pytest.mark.parametrize("how", ["interrupt", "fail"])
def test_a_failed_capture_leaves_nothing(store: ImageStore, how: str) -> None:
    rsync = FakeRsync()
    run_capture(store, rsync)
    if how == "interrupt":
        rsync.interrupt = True
        expected: type[BaseException] = KeyboardInterrupt
    else:
        rsync.fail = RsyncOutcome(23, 'rsync: read errors mapping "/srv/x": Input/output error')
        expected = CaptureError
    with pytest.raises(expected):
        run_capture(store, rsync)
    assert [v.ref for v in store.versions("golden")] == ["golden:1"]
    assert list((store.root / ".tmp").iterdir()) == []
    assert sorted(p.name for p in store.image_dir("golden").iterdir()) == [".last", "v1"]


def test_an_unusable_source_copies_nothing(store: ImageStore) -> None:
    rsync = FakeRsync()
    with pytest.raises(SourceError, match="connection refused"):
        capture(
            store,
            "golden",
            source(),
            runner=fake_ssh(255, "", "Connection refused"),  # type: ignore[arg-type]
            transfer=rsync,
        )
    assert rsync.calls == []
    assert store.names() == []


def test_missing_local_tools(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture_mod.shutil, "which", lambda name: None)
    with pytest.raises(CaptureError, match="rsync is not installed on this machine") as caught:
        run_capture(store, FakeRsync())
    assert caught.value.hint == "install it: apt-get install rsync ('make setup' does)"
