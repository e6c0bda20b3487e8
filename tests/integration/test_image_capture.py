"""`corral image capture` for real: rsync over SSH from a "golden node" that is a real sshd
in a network namespace, reached from this namespace through a veth pair.

That sshd serves this machine's own file system, so the golden node's root is a directory
in the test's temporary directory, captured with ``--source-path``. Its ``/boot`` is a
separate ext4 file system (a loop mount), as on many real nodes, to prove that the capture
crosses into disk file systems but not into the others.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.run import run, spawn
from corral.testbed.netns import PxeNetwork, run_prefix
from tests.conftest import corral

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, sshd)"),
]

SSHD = "/usr/sbin/sshd"


@dataclass
class GoldenNode:
    address: str  # where sshd listens, inside the namespace
    root: Path  # the node's "/" on this machine's file system
    key: Path  # the client key sshd accepts
    boot_mounted: bool  # /boot is a file system of its own


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 for the veth pair that this machine does not use yet (one per test run)."""
    used = run(["ip", "-4", "-o", "addr", "show"]).stdout
    for i in range(250):
        net = ipaddress.IPv4Network(f"10.231.{(os.getpid() + i) % 250}.0/24")
        taken = (f" {net.network_address + n}/" in used for n in (1, 2))
        if not any(taken):
            return net
    raise RuntimeError("no free 10.231.x.0/24 subnet")


def _golden_tree(root: Path) -> None:
    """A small root tree with what a capture must keep and what it must leave out."""
    for d in ("bin", "etc/ssh", "proc/1", "sys/kernel", "dev", "run/lock", "tmp", "var/tmp",
              "var/log/journal/abc", "var/cache/apt/archives", "var/lib/dbus", "home/user",
              "mnt/nfs", "boot", "usr/lib"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "bin/tool").write_text("#!/bin/sh\necho tool\n")
    (root / "bin/tool").chmod(0o4755)  # setuid survives
    os.link(root / "bin/tool", root / "bin/tool-link")  # a hard link stays one
    (root / "bin/sh").symlink_to("tool")
    (root / "etc/hostname").write_text("golden01\n")
    (root / "etc/fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/ssh/sshd_config").write_text("PermitRootLogin prohibit-password\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("PRIVATE\n")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA\n")
    (root / "proc/1/status").write_text("not a real proc\n")
    (root / "sys/kernel/x").write_text("x\n")
    (root / "run/lock/pid").write_text("1\n")
    (root / "tmp/scratch").write_text("scratch\n")
    (root / "var/log/journal/abc/system.journal").write_text("journal\n")
    (root / "var/log/syslog").write_text("kept\n")
    (root / "var/cache/apt/archives/htop_3_amd64.deb").write_text("deb\n")
    (root / "swapfile").write_bytes(b"\0" * 4096)
    (root / "mnt/nfs/share").write_text("not the image's\n")
    (root / "home/user/notes").write_text("notes\n")
    os.chown(root / "home/user/notes", 1234, 1234)  # a uid this machine may not know
    (root / "home/user").chmod(0o700)
    os.chown(root / "home/user", 1234, 1234)
    (root / "usr/lib/cap").write_text("capability\n")
    with contextlib.suppress(OSError):  # where the file system has user xattrs
        os.setxattr(root / "usr/lib/cap", "user.corral", b"kept")
    os.mkfifo(root / "run/fifo")


def _mount_boot(root: Path, image: Path) -> bool:
    """Make ``root/boot`` an ext4 file system of its own (False where loop mounts fail)."""
    run(["truncate", "-s", "16M", str(image)])
    run(["mkfs.ext4", "-q", "-F", str(image)])
    mounted = run(["mount", "-o", "loop", str(image), str(root / "boot")], check=False)
    return mounted.returncode == 0


def _write_boot(root: Path) -> None:
    (root / "boot/vmlinuz-6.1.0-golden").write_text("kernel\n")
    (root / "boot/grub").mkdir(exist_ok=True)
    (root / "boot/grub/grub.cfg").write_text("menuentry golden {}\n")


@pytest.fixture
def golden(tmp_path: Path) -> Iterator[GoldenNode]:
    net_addr = _free_subnet()
    node_ip, host_ip = net_addr.network_address + 1, net_addr.network_address + 2
    veth = f"cvc{os.getpid() % 10**8}"
    work = tmp_path / "sshd"
    work.mkdir()
    for key in ("host_key", "client_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)])
    (work / "authorized_keys").write_text((work / "client_key.pub").read_text())
    config = work / "sshd_config"
    config.write_text(
        f"ListenAddress {node_ip}\nPort 22\nHostKey {work / 'host_key'}\n"
        f"AuthorizedKeysFile {work / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\n"
        "UsePAM no\nPidFile none\nPrintMotd no\nLogLevel VERBOSE\n"
    )
    root = tmp_path / "golden"
    root.mkdir()
    _golden_tree(root)
    boot_mounted = _mount_boot(root, tmp_path / "boot.img")
    _write_boot(root)
    privsep = Path("/run/sshd")  # sshd refuses to start without it
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    net = PxeNetwork(run_prefix() + "capture", address=f"{node_ip}/24")
    sshd: subprocess.Popen[bytes] | None = None
    try:
        net.create()
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", net.name])
        net.ip("link", "set", "eth0", "master", net.bridge)
        net.ip("link", "set", "eth0", "up")
        run(["ip", "addr", "add", f"{host_ip}/24", "dev", veth])
        run(["ip", "link", "set", veth, "up"])
        with open(work / "sshd.log", "wb") as sshd_log:  # sshd -e logs to stderr
            sshd = spawn(net.exec([SSHD, "-D", "-e", "-f", str(config)]), stderr=sshd_log.fileno())
        deadline = time.monotonic() + 20
        while f"{node_ip}:22 " not in net.run(["ss", "-tln"]):
            if sshd.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(work / 'sshd.log').read_text()}")
            time.sleep(0.1)
        yield GoldenNode(str(node_ip), root, work / "client_key", boot_mounted)
    finally:
        if sshd is not None:
            sshd.terminate()
            try:
                sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait()
        net.close()
        run(["ip", "link", "del", veth], check=False)
        if boot_mounted:
            run(["umount", str(root / "boot")], check=False)
        if made_privsep:
            with contextlib.suppress(OSError):
                privsep.rmdir()


def _capture(
    node: GoldenNode, home: Path, *extra: str, target: str | None = None
) -> subprocess.CompletedProcess[str]:
    return corral(
        "image", "capture", target or node.address, "--name", "golden",
        "--ssh-key", str(node.key), "--source-path", str(node.root), "--no-exports",
        *extra, home=home,
    )  # fmt: skip


def _listing(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path below ``root`` with its type, mode, owner, and content or link target."""
    entries: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                what: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                what = path.read_bytes()
            else:
                what = None
            relative = str(path.relative_to(root))
            entries[relative] = (info.st_mode, info.st_uid, info.st_gid, what)
    return entries


def test_capture_a_golden_node(tmp_path: Path, golden: GoldenNode) -> None:
    home = tmp_path / "home"
    result = _capture(golden, home)
    assert result.returncode == 0, result.stderr
    assert "captured golden:1 from root@" in result.stdout
    version = home / "images/golden/v1"
    tree = version / "rootfs"

    # What must be left out was, and the mount points and scratch directories stayed.
    for gone in ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub",
                 "proc/1", "sys/kernel", "run/lock", "run/fifo", "tmp/scratch",
                 "var/log/journal/abc", "var/cache/apt/archives/htop_3_amd64.deb", "swapfile",
                 "mnt/nfs"):  # fmt: skip
        assert not (tree / gone).exists() and not (tree / gone).is_symlink(), gone
    for empty in ("proc", "sys", "dev", "run", "tmp", "var/tmp", "mnt", "var/log/journal"):
        assert (tree / empty).is_dir() and list((tree / empty).iterdir()) == [], empty
    assert stat.S_IMODE((tree / "tmp").stat().st_mode) == 0o1777
    assert (tree / "etc/machine-id").read_text() == ""
    assert os.readlink(tree / "var/lib/dbus/machine-id") == "/etc/machine-id"
    assert (tree / "etc/hostname").read_text() == "localhost\n"  # no identity, as built ones

    # Everything else is the node's, bit for bit, owners as numbers, links as links.
    source = _listing(golden.root)
    captured = _listing(tree)
    changed = {"etc/hostname", "etc/machine-id", "var/lib/dbus/machine-id"}
    left_out = {k for k in source if k not in captured}
    assert all(
        k.startswith(("etc/ssh/ssh_host_", "proc/", "sys/", "run/", "tmp/", "var/log/journal/",
                      "var/cache/apt/archives/", "mnt/nfs", "swapfile", "boot/lost+found"))
        for k in left_out
    ), left_out  # fmt: skip
    for key, value in source.items():
        if key in captured and key not in changed:
            assert captured[key] == value, key
    assert captured["home/user/notes"][1:3] == (1234, 1234)
    assert stat.S_IMODE(captured["bin/tool"][0]) == 0o4755
    assert (tree / "bin/tool").stat().st_ino == (tree / "bin/tool-link").stat().st_ino
    with contextlib.suppress(OSError):
        if os.getxattr(golden.root / "usr/lib/cap", "user.corral") == b"kept":
            assert os.getxattr(tree / "usr/lib/cap", "user.corral") == b"kept"
    # /boot, a file system of its own, came along.
    assert (tree / "boot/vmlinuz-6.1.0-golden").read_text() == "kernel\n"
    assert (tree / "boot/grub/grub.cfg").is_file()
    if golden.boot_mounted:
        assert not (tree / "boot/lost+found").exists()  # ext4's own: left out

    # The manifest says where the version came from.
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["origin"] == f"capture root@{golden.address}:{golden.root}"
    record = manifest["capture"]
    assert record["host"] == golden.address and record["node"] is None
    assert record["source_path"] == str(golden.root)
    assert record["hostname"]  # uname -n of the "node"
    assert "/etc/ssh/ssh_host_*" in record["excludes"]
    assert record["started"] <= record["finished"]
    assert record["seeded_from"] is None
    if golden.boot_mounted:
        assert record["filesystems"] == ["/", "/boot"]
    assert manifest["file_count"] > 10

    # A second capture, after changes on the node, is version 2: only the changes travel,
    # deleted files go, version 1 stays as it was; --exclude adds to the defaults.
    (golden.root / "etc/fstab").unlink()
    (golden.root / "etc/motd").write_text("updated\n")
    (golden.root / "home/user/big").write_bytes(os.urandom(1 << 20))
    again = _capture(golden, home, "--exclude", "/home/user/big")
    assert again.returncode == 0, again.stderr
    assert "captured golden:2" in again.stdout and "on top of golden:1" in again.stdout
    tree2 = home / "images/golden/v2/rootfs"
    assert not (tree2 / "etc/fstab").exists()
    assert (tree2 / "etc/motd").read_text() == "updated\n"
    assert not (tree2 / "home/user/big").exists()
    assert (tree2 / "etc/machine-id").read_text() == ""
    assert (tree / "etc/fstab").is_file() and not (tree / "etc/motd").exists()
    record2 = json.loads((home / "images/golden/v2/manifest.json").read_text())["capture"]
    assert record2["seeded_from"] == "golden:1"
    assert "/home/user/big" in record2["excludes"]
    assert list((home / "images/.tmp").iterdir()) == []

    # By inventory node name: its first interface's IP.
    added = corral("node", "add", "golden01", "--ip", golden.address, home=home)
    assert added.returncode == 0, added.stderr
    third = _capture(golden, home, target="golden01")
    assert third.returncode == 0, third.stderr
    record3 = json.loads((home / "images/golden/v3/manifest.json").read_text())["capture"]
    assert record3["node"] == "golden01" and record3["host"] == golden.address


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_capture_errors(tmp_path: Path, golden: GoldenNode) -> None:
    home = tmp_path / "home"
    # Nothing listens there.
    refused = _capture(golden, home, "--ssh-port", "2222")
    _one_line_error(refused, "connection refused")
    assert "--ssh-port" in refused.stderr
    # A key the node does not accept.
    other = tmp_path / "other_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    denied = corral(
        "image", "capture", golden.address, "--name", "golden", "--ssh-key", str(other),
        "--source-path", str(golden.root), home=home,
    )  # fmt: skip
    _one_line_error(denied, "refused the login")
    assert "--ssh-key" in denied.stderr
    # No such directory on the node.
    missing = _capture(golden, home, "--source-path", str(tmp_path / "nope"))
    _one_line_error(missing, "no directory")
    # An inventory node without an address.
    assert corral("node", "add", "noaddr", home=home).returncode == 0
    _one_line_error(_capture(golden, home, target="noaddr"), "node 'noaddr' has no IP address")
    # A host name given as user@host.
    _one_line_error(_capture(golden, home, target="root@x"), "invalid host")
    # None of it left a version or a staging directory behind.
    assert not (home / "images/golden").exists()
    tmp = home / "images/.tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
