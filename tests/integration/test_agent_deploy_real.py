"""The agent's installer on real parts: a loop device with partitions, sfdisk, mkfs, mount,
zstd | tar fed by chunks over a real HTTP server (that corrupts one chunk once and cuts a
connection once), and rsync from a real rsync daemon, twice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corral.agent import disk
from corral.agent.deploy import Installer, InstallSettings
from corral.agent.disk import mounts_under
from corral.agent.errors import ReceiveError
from corral.agent.plan import (
    Chunk,
    Disk,
    Identity,
    ImageInfo,
    Interface,
    Partition,
    Plan,
    TransportInfo,
)
from corral.agent.receivers.http import HttpReceiver
from corral.agent.receivers.stream import Unpacker
from corral.agent.report import Client
from corral.agent.run import SubprocessRunner
from corral.images.exports import build_exports
from corral.images.store import ImageStore, ImageVersion

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mkfs, mount)"),
]

TOKEN = "node-token"
DISK_MB = 512
SSH_KEYS = {
    "ssh_host_ed25519_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH "
    "PRIVATE KEY-----\n",
    "ssh_host_ed25519_key.pub": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake root@n01\n",
}
ROOT_HASH = "$6$salt$Jk0IxVt2wP3lC1Bt6b7yXqzIuOa0k0F5nqzZ3Qq9v5mFq2eKk1m1B0G9Y4T5o6m7n8p9q0r1s2t3"


# --- the image -------------------------------------------------------------------------


def make_tree(root: Path, *, identity_files: bool = True) -> Path:
    """A small root tree: a 10 MiB random file, a symlink, a hard link, an xattr, owners,
    modes, a /boot file (lands on its own partition) and a static shell for the chroot."""
    for d in ("etc", "usr/bin", "usr/lib", "var/lib", "boot", "root", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "bin").symlink_to("usr/bin")
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is installed by scripts/setup.sh"
    shutil.copy2(busybox, root / "usr/bin/busybox")
    (root / "usr/bin/sh").symlink_to("busybox")
    (root / "var/lib/blob").write_bytes(os.urandom(10 << 20))
    tool = root / "usr/bin/tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o4755)
    os.link(tool, root / "usr/bin/tool-hardlink")
    (root / "usr/bin/tool-link").symlink_to("tool")
    (root / "usr/lib/os-release").write_text('ID=corraltest\nPRETTY_NAME="corral test"\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    marked = root / "etc/marked"
    marked.write_text("with an xattr\n")
    os.setxattr(marked, "user.corral", b"kept")
    owned = root / "etc/owned"
    owned.write_text("owned\n")
    os.chown(owned, 1234, 5678)
    secret = root / "etc/secret"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)
    (root / "boot/vmlinuz-test").write_bytes(b"not a kernel" * 1000)
    (root / "etc/group").write_text("root:x:0:\nshadow:x:42:\n")
    if identity_files:
        (root / "etc/hostname").write_text("image\n")
        (root / "etc/network").mkdir()
        (root / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\n")
        shadow = root / "etc/shadow"
        shadow.write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
        shadow.chmod(0o640)
        os.chown(shadow, 0, 42)
    return root


#: What the installer rewrites or adds: not compared with the image.
CHANGED = {
    "etc/hostname",
    "etc/hosts",
    "etc/fstab",
    "etc/shadow",
    "etc/machine-id",
    "etc/network/interfaces",
}


def snapshot(root: Path) -> dict[str, Any]:
    """Type, mode, owner, size, mtime, content, link target, user xattrs of every entry,
    and which paths share an inode."""
    entries: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            info: dict[str, Any] = {
                "mode": st.st_mode,
                "owner": (st.st_uid, st.st_gid),
                "xattrs": {
                    k: os.getxattr(path, k, follow_symlinks=False)
                    for k in os.listxattr(path, follow_symlinks=False)
                    if k.startswith("user.")
                },
            }
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                info["mtime"] = int(st.st_mtime)
                info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            entries[rel] = info
    links = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return {"entries": entries, "hardlinks": links}


def assert_same_tree(source: Path, installed: Path) -> None:
    ours, theirs = snapshot(source), snapshot(installed)
    for rel, info in ours["entries"].items():
        if rel in CHANGED:
            continue
        assert rel in theirs["entries"], f"{rel} was not installed"
        assert theirs["entries"][rel] == info, rel
    assert ["usr/bin/tool", "usr/bin/tool-hardlink"] in theirs["hardlinks"]
    assert theirs["hardlinks"] == ours["hardlinks"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageVersion, Path]:
    base = tmp_path_factory.mktemp("agent-image")
    tree = make_tree(base / "src")
    version = ImageStore(base / "images").import_tree("node", tree)
    build_exports(version, level=3, which=["stream"])
    return version, tree


def image_info(version: ImageVersion) -> ImageInfo:
    index = json.loads((version.path / "exports/stream.json").read_text())
    files = {f["name"]: f for f in version.manifest["exports"]["stream"]["files"]}
    chunks = [
        Chunk(sha256=h, size=files[f"exports/chunks/{i:08d}.bin"]["size"])
        for i, h in enumerate(index["chunks"])
    ]
    return ImageInfo(
        ref=version.ref,
        stream_sha256=index["sha256"],
        stream_size=index["size"],
        chunk_size=index["chunk_size"],
        chunks=chunks,
        tree_bytes=int(version.manifest["size_bytes"]),
        files=int(version.manifest["file_count"]),
    )


# --- the server ------------------------------------------------------------------------


@dataclass
class Server:
    url: str = ""
    exports: Path | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    corrupt_once: set[int] = field(default_factory=set)
    cut_once: dict[int, int] = field(default_factory=dict)  # chunk -> bytes sent before the cut
    cancel: bool = False


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.requests.append(
                {
                    "path": self.path,
                    "range": self.headers.get("Range"),
                    "authorization": self.headers.get("Authorization"),
                }
            )
            name = self.path.rsplit("/", 1)[-1]
            assert state.exports is not None
            path = state.exports / "chunks" / name
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(401)
                return
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            index = int(name.split(".")[0])
            if index in state.corrupt_once:
                state.corrupt_once.discard(index)
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            start = 0
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
                start = int(wanted[6:-1])
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if index in state.cut_once:
                cut = state.cut_once.pop(index)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            state.progress.append({"path": self.path, **body})
            answer = json.dumps({"cancel": state.cancel}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# --- the disk --------------------------------------------------------------------------


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A 512 MiB sparse file as a loop device with partition scanning; detached after,
    with whatever is still mounted under the test's directory."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(DISK_MB << 20)
    device = subprocess.run(
        ["losetup", "-f", "--show", "-P", str(backing)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield device, backing
    finally:
        for point in mounts_under(tmp_path):
            subprocess.run(["umount", "-l", point], check=False)
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[str]]:
    """Mount points a test adds by hand; unmounted (newest first) after it."""
    points: list[str] = []
    try:
        yield points
    finally:
        for point in reversed(points):
            subprocess.run(["umount", point], check=False)


def mount(points: list[str], device: str, where: Path, *options: str) -> None:
    """mount(8), patient with a device that is still busy from its last unmount.

    Read-write, as the installer mounted it: when another mount namespace (made while the
    installer had it mounted, on a host whose / is not shared) still holds the filesystem,
    a read-write mount shares it where a read-only one would be refused."""
    where.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        done = subprocess.run(
            ["mount", *options, device, str(where)], capture_output=True, text=True
        )
        if done.returncode == 0 or "busy" not in done.stderr:
            break
        time.sleep(0.5)
    assert done.returncode == 0, done.stderr
    points.append(str(where))


def fs_uuid(device: str) -> str:
    return subprocess.run(
        ["blkid", "-s", "UUID", "-o", "value", device], capture_output=True, text=True, check=True
    ).stdout.strip()


def make_plan(
    image: ImageInfo,
    transport: TransportInfo,
    device: str,
    partitions: list[Partition],
    *,
    post_script: str = "",
) -> Plan:
    return Plan(
        deployment=7,
        node="n01",
        image=image,
        transport=transport,
        disk=Disk(device=device, label="gpt", partitions=partitions),
        identity=Identity(
            hostname="n01.cluster.lab",
            interfaces=[
                Interface("eth0", "52:54:00:AA:00:01", "10.20.0.11", "255.255.255.0", "10.20.0.1"),
                Interface("eth1", "52:54:00:aa:00:02", None, "", None),
            ],
            ssh_host_keys=SSH_KEYS,
            authorized_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin admin@lab"],
            root_password_hash=ROOT_HASH,
        ),
        bootloader="none",
        post_script=post_script,
        report_interval=0.2,
    )


def installer(plan: Plan, server_url: str, work: Path) -> Installer:
    client = Client(server_url, TOKEN, tries=3, backoff=0.05, timeout=10)
    settings = InstallSettings(work_dir=work, tries=3)
    return Installer(plan, client, SubprocessRunner(), settings)


# --- the tests -------------------------------------------------------------------------


def kernel_has(fstype: str) -> bool:
    lines = Path("/proc/filesystems").read_text().splitlines()
    return any(line.split()[-1:] == [fstype] for line in lines)


#: An EFI system partition only where the kernel mounts vfat (not every test machine's does).
HTTP_LAYOUT = [
    Partition("/boot", "ext4", 48),
    *([Partition("/boot/efi", "efi", 40)] if kernel_has("vfat") else []),
    Partition("swap", "swap", 16),
    Partition("/", "ext4", 0, grow=True),
]


def test_http_install_checks_chunks_resumes_and_configures(
    image: tuple[ImageVersion, Path],
    server: Server,
    loop: tuple[str, Path],
    tmp_path: Path,
    mounted: list[str],
) -> None:
    version, tree = image
    device, _ = loop
    info = image_info(version)
    assert len(info.chunks) >= 3  # 10 MiB of random bytes in 4 MiB chunks
    server.exports = version.path / "exports"
    server.corrupt_once = {1}
    server.cut_once = {2: 1_000_000}
    base = f"{server.url}/images/node/{version.version}"
    post = "echo post-install ran as $(id -u) on $CORRAL_NODE\necho ok > /root/post-ran\n"
    plan = make_plan(
        info, TransportInfo("http", {"base": base}), device, HTTP_LAYOUT, post_script=post
    )
    work = tmp_path / "target"

    inst = installer(plan, server.url, work)
    final = inst.run()

    assert final.phase == "done", final.message + "\n" + final.log_tail
    assert inst.phases == ["partitioning", "receiving", "configuring", "post-install", "done"]
    assert mounts_under(work) == []
    assert final.bytes == final.total == info.stream_size
    assert "post-install: post-install ran as 0 on n01" in final.log_tail
    # the corrupt chunk was fetched again, the cut one resumed where it broke
    chunk_gets = [r for r in server.requests if r["path"].endswith(".bin")]
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in chunk_gets)
    assert [r["range"] for r in chunk_gets if r["path"].endswith("/00000001.bin")] == [None, None]
    assert [r["range"] for r in chunk_gets if r["path"].endswith("/00000002.bin")] == [
        None,
        "bytes=1000000-",
    ]
    receiver = inst.receiver
    assert isinstance(receiver, HttpReceiver)
    assert receiver.refetched == [1] and receiver.resumed == [(2, 1_000_000)]
    # progress: every phase in order, then the final report with the log's tail
    assert all(p["path"] == "/api/v1/deployments/7/nodes/n01/progress" for p in server.progress)
    phases = [p["phase"] for p in server.progress]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "partitioning",
        "receiving",
        "configuring",
        "post-install",
        "done",
    ]
    assert server.progress[-1]["log_tail"].count("\n") >= 10

    layout = inst.layout
    assert layout is not None
    volumes = {v.mount: v for v in layout.volumes}
    root, boot, swap = volumes["/"], volumes["/boot"], volumes["swap"]
    esp = volumes.get("/boot/efi")
    for volume in volumes.values():
        assert fs_uuid(volume.device) == volume.uuid
    target = tmp_path / "check"
    mount(mounted, root.device, target)
    mount(mounted, boot.device, target / "boot")
    if esp is not None:
        mount(mounted, esp.device, target / "boot/efi")
    assert_same_tree(tree, target)

    etc = target / "etc"
    assert (etc / "hostname").read_text() == "n01\n"
    assert "10.20.0.11\tn01.cluster.lab n01" in (etc / "hosts").read_text()
    fstab = (etc / "fstab").read_text()
    assert f"UUID={root.uuid}\t/\text4\tdefaults,errors=remount-ro\t0\t1" in fstab
    assert f"UUID={boot.uuid}\t/boot\text4\tdefaults\t0\t2" in fstab
    if esp is not None:
        assert f"UUID={esp.uuid}\t/boot/efi\tvfat\tumask=0077\t0\t2" in fstab
    assert f"UUID={swap.uuid}\tnone\tswap\tsw\t0\t0" in fstab
    network = (etc / "systemd/network/10-corral-eth0.network").read_text()
    assert "MACAddress=52:54:00:aa:00:01" in network and "Address=10.20.0.11/24" in network
    assert "DHCP=ipv4" in (etc / "systemd/network/10-corral-eth1.network").read_text()
    interfaces = (etc / "network/interfaces").read_text()
    assert "iface eth0 inet static" in interfaces and "iface eth1 inet dhcp" in interfaces
    key = etc / "ssh/ssh_host_ed25519_key"
    assert key.read_text() == SSH_KEYS["ssh_host_ed25519_key"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "ssh/ssh_host_ed25519_key.pub").stat().st_mode) == 0o644
    ssh_dir = target / "root/.ssh"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssh_dir / "authorized_keys").stat().st_mode) == 0o600
    assert "admin@lab" in (ssh_dir / "authorized_keys").read_text()
    shadow = etc / "shadow"
    assert shadow.read_text().splitlines()[0].startswith(f"root:{ROOT_HASH}:")
    assert "daemon:*:19000" in shadow.read_text()
    assert (shadow.stat().st_gid, stat.S_IMODE(shadow.stat().st_mode)) == (42, 0o640)
    assert (etc / "machine-id").read_text() == ""
    stamp = json.loads((etc / "corral/layout.json").read_text())
    assert [v["uuid"] for v in stamp["volumes"]] == [v.uuid for v in layout.volumes]
    assert (target / "root/post-ran").read_text() == "ok\n"
    assert not (target / "root/corral-post-install.sh").exists()
    assert not list(work.glob("*/*"))  # nothing left mounted in the work directory


RSYNC_LAYOUT = [Partition("swap", "swap", 16), Partition("/", "xfs", 0, grow=True)]


@pytest.fixture
def rsync_daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``rsync --daemon`` on a free port with a read-only module ``node``."""
    tree = make_tree(tmp_path / "served", identity_files=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "rsyncd.conf"
    config.write_text(
        f"pid file = {tmp_path}/rsyncd.pid\nuse chroot = no\naddress = 127.0.0.1\n"
        f"[node]\n    path = {tree}\n    read only = yes\n    uid = root\n    gid = root\n"
        "    numeric ids = yes\n"
    )
    proc = subprocess.Popen(
        ["rsync", "--daemon", "--no-detach", f"--config={config}", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "rsyncd did not start"
                time.sleep(0.05)
        yield f"rsync://127.0.0.1:{port}/node/", tree
    finally:
        proc.kill()
        proc.wait()


def test_rsync_install_then_redeploy_moves_only_the_change(
    rsync_daemon: tuple[str, Path],
    server: Server,
    loop: tuple[str, Path],
    tmp_path: Path,
    mounted: list[str],
) -> None:
    url, tree = rsync_daemon
    device, _ = loop
    image = ImageInfo("node:1", "", 0, 0, [], tree_bytes=11 << 20, files=20)
    plan = make_plan(image, TransportInfo("rsync", {"url": url}), device, RSYNC_LAYOUT)
    work = tmp_path / "target"

    first = installer(plan, server.url, work)
    final = first.run()
    assert final.phase == "done", final.message + "\n" + final.log_tail
    assert not first.reused
    assert first.received is not None
    assert first.received.details["literal"] >= 10 << 20
    assert final.bytes >= 10 << 20
    layout = first.layout
    assert layout is not None
    root_uuid = fs_uuid(layout.root.device)
    assert root_uuid == layout.root.uuid

    changed = tree / "etc/marked"
    changed.write_text("changed for the second deployment\n")
    second = installer(plan, server.url, work)
    final = second.run()
    assert final.phase == "done", final.message + "\n" + final.log_tail
    assert second.reused  # no sfdisk, no mkfs: the same filesystems
    assert second.layout == layout
    assert fs_uuid(layout.root.device) == root_uuid
    assert second.received is not None
    stats = second.received.details
    assert stats["files"] == 1, stats  # only the changed file
    assert stats["literal"] < 1 << 20
    assert "mkfs" not in final.log_tail and "sfdisk --quiet" not in final.log_tail
    assert mounts_under(work) == []

    target = tmp_path / "check"
    mount(mounted, layout.root.device, target)
    assert_same_tree(tree, target)
    assert (target / "etc/marked").read_text() == "changed for the second deployment\n"
    assert (target / "etc/hostname").read_text() == "n01\n"
    assert (target / "etc/corral/layout.json").is_file()


def test_a_disk_too_small_is_refused_before_any_write(
    image: tuple[ImageVersion, Path], server: Server, loop: tuple[str, Path], tmp_path: Path
) -> None:
    version, _ = image
    device, backing = loop
    info = image_info(version)
    partitions = [Partition("swap", "swap", 600), Partition("/", "ext4", 0, grow=True)]
    plan = make_plan(info, TransportInfo("http", {"base": server.url}), device, partitions)
    inst = installer(plan, server.url, tmp_path / "target")
    final = inst.run()
    assert final.phase == "failed"
    assert "too small" in final.message and f"{DISK_MB} MiB" in final.message
    assert inst.phases == ["partitioning", "failed"]
    with open(backing, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
    assert server.progress[-1]["phase"] == "failed"
    assert server.progress[-1]["message"] == final.message
    assert not [r for r in server.requests if r["path"].endswith(".bin")]


def test_a_failing_post_script_fails_and_unmounts(
    image: tuple[ImageVersion, Path], server: Server, loop: tuple[str, Path], tmp_path: Path
) -> None:
    version, _ = image
    device, _ = loop
    server.exports = version.path / "exports"
    base = f"{server.url}/images/node/{version.version}"
    partitions = [Partition("/", "ext4", 0, grow=True)]
    script = "echo about to fail\necho 'no such package' >&2\nexit 3\n"
    plan = make_plan(
        image_info(version),
        TransportInfo("http", {"base": base}),
        device,
        partitions,
        post_script=script,
    )
    work = tmp_path / "target"
    inst = installer(plan, server.url, work)
    final = inst.run()
    assert final.phase == "failed"
    assert final.message == "post-install script exited with 3: no such package"
    assert "post-install: about to fail" in final.log_tail
    assert mounts_under(work) == []
    assert disk.mounts_under(tmp_path) == []


def test_the_unpacker_names_the_tool_that_failed(tmp_path: Path) -> None:
    unpacker = Unpacker(tmp_path)
    unpacker.write(b"this is not zstd" * 1000)
    with pytest.raises(ReceiveError, match=r"unpacking failed: zstd exited with 1: .*") as info:
        unpacker.finish()
    assert "tar exited with 2" in str(info.value)  # tar saw an empty archive
    assert list(tmp_path.iterdir()) == []
