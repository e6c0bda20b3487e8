"""corral.serve.tftp against real clients: tftp-hpa, curl and atftp, plus a raw-socket client.

Every server listens on 127.0.0.1 with a kernel-chosen port and is stopped in the fixture's
teardown.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.inventory import db
from corral.inventory.schema import NodeSpec
from corral.serve.boot import BootService
from corral.serve.http import create_app
from corral.serve.tftp import Resolver, TftpServer

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
RUN_TIMEOUT = 60  # seconds for one client run
MiB = 1024 * 1024

Factory = Callable[..., TftpServer]


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The TFTP root, with a secret file beside it that must never be served."""
    path = tmp_path / "root"
    path.mkdir()
    (tmp_path / "secret.txt").write_bytes(b"top secret\n")
    return path


@pytest.fixture
def serve(root: Path) -> Iterator[Factory]:
    """Start servers on ``root``; every one is stopped at teardown."""
    servers: list[TftpServer] = []

    def start(resolver: Resolver | None = None) -> TftpServer:
        server = TftpServer(root, resolver, host=HOST, port=0)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="corral.tftp")
    return caplog


def put_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def wait_for_log(caplog: pytest.LogCaptureFixture, pattern: str, count: int = 1) -> list[str]:
    """The corral.tftp messages matching ``pattern``, once there are ``count`` of them.

    A transfer logs after the client's last ACK reaches the server, which can be just after
    the client process has exited.
    """
    deadline = time.monotonic() + 10
    while True:
        found = [
            r.getMessage()
            for r in caplog.records
            if r.name == "corral.tftp" and re.search(pattern, r.getMessage())
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# -- the real clients --------------------------------------------------------------------


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL
    )


def tftp_hpa(port: int, *command: str, mode: str = "binary", host: str = HOST) -> str:
    """Run tftp-hpa; it exits 0 even on errors, so return everything it printed."""
    done = run("tftp", "-v", host, str(port), "-m", mode, "-c", *command)
    assert done.returncode == 0, done
    return done.stdout + done.stderr


def curl(
    port: int, name: str, out: Path, *options: str, host: str = HOST
) -> subprocess.CompletedProcess[str]:
    return run("curl", "-sS", "-v", *options, "-o", str(out), f"tftp://{host}:{port}/{name}")


def atftp(port: int, name: str, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    argv = ["atftp", "--get", "-r", name, "-l", str(out), "--trace", "--verbose"]
    for option in options:
        argv += ["--option", option]
    return run(*argv, HOST, str(port))


def atftp_trace(output: str) -> tuple[dict[str, str], list[tuple[int, int]], list[int]]:
    """The OACK's options, the DATA packets (block, size) and the ACKs in ``--trace``."""
    oack_match = re.search(r"received OACK <(.*)>", output)
    oack = dict(re.findall(r"(\w+): (\d+)", oack_match.group(1))) if oack_match else {}
    data = [
        (int(block), int(size))
        for block, size in re.findall(r"received \d+\. DATA <block: (\d+), size:? (\d+)>", output)
    ]
    acks = [int(block) for block in re.findall(r"sent ACK <block: (\d+)>", output)]
    return oack, data, acks


def not_served(out: Path, *forbidden: bytes) -> bool:
    """The client wrote nothing of the forbidden content."""
    if not out.exists():
        return True
    content = out.read_bytes()
    return not any(f in content for f in forbidden if f)


# -- a raw client, to see the packets ------------------------------------------------------


class RawClient:
    """A bare TFTP client: sends what it is told, returns each packet it receives."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.server = (host, port)
        self.tid: tuple[str, int] | None = None

    def close(self) -> None:
        self.sock.close()

    def request(self, name: str, mode: str = "octet", **options: str | int) -> None:
        fields = [name, mode, *(str(x) for kv in options.items() for x in kv)]
        packet = struct.pack("!H", 1) + b"".join(f.encode() + b"\0" for f in fields)
        self.sock.sendto(packet, self.server)

    def ack(self, block: int) -> None:
        assert self.tid is not None
        self.sock.sendto(struct.pack("!HH", 4, block), self.tid)

    def receive(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next packet as (opcode, rest); raises TimeoutError if none comes in time."""
        self.sock.settimeout(timeout)
        packet, sender = self.sock.recvfrom(70000)
        if self.tid is None:
            self.tid = sender
        assert sender == self.tid, "every packet of a transfer comes from one port"
        return struct.unpack("!H", packet[:2])[0], packet[2:]

    def oack(self) -> dict[str, str]:
        opcode, rest = self.receive()
        assert opcode == 6, (opcode, rest)
        fields = rest.split(b"\0")[:-1]
        return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}

    def data(self, timeout: float = 5.0) -> tuple[int, bytes]:
        opcode, rest = self.receive(timeout)
        assert opcode == 3, (opcode, rest)
        return struct.unpack("!H", rest[:2])[0], rest[2:]

    def error(self) -> tuple[int, str]:
        opcode, rest = self.receive()
        assert opcode == 5, (opcode, rest)
        return struct.unpack("!H", rest[:2])[0], rest[2:].rstrip(b"\0").decode()

    def silent(self, seconds: float) -> bool:
        """Nothing arrives for ``seconds``."""
        try:
            self.receive(seconds)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def raw_client() -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def make(port: int, host: str = HOST) -> RawClient:
        client = RawClient(port, host)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()


# -- static and dynamic files --------------------------------------------------------------


def test_static_file_is_byte_identical_with_every_client(
    serve: Factory, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    data = put_random(root / "images" / "boot.img", 3 * MiB)
    server = serve()

    out = tmp_path / "hpa.img"
    said = tftp_hpa(server.port, "get", "/images/boot.img", str(out))
    assert "Received 3145728 bytes" in said
    assert out.read_bytes() == data

    out = tmp_path / "curl.img"
    assert curl(server.port, "images/boot.img", out).returncode == 0
    assert out.read_bytes() == data

    out = tmp_path / "atftp.img"
    assert atftp(server.port, "images/boot.img", out).returncode == 0
    assert out.read_bytes() == data

    lines = wait_for_log(logs, r"path='/?images/boot.img' bytes=3145728 outcome=ok", 3)
    assert len(lines) == 3
    assert all("client=127.0.0.1:" in line for line in lines)


def test_dynamic_files_come_from_the_resolver(serve: Factory, root: Path, tmp_path: Path) -> None:
    (root / "grub.cfg").write_bytes(b"static grub.cfg\n")
    pxelinux = put_random(root / "pxelinux.0", 40000)
    calls: list[tuple[str, str]] = []

    def resolver(path: str, client: str) -> bytes | None:
        calls.append((path, client))
        if path.startswith("pxelinux.cfg/") or path == "grub.cfg":
            return f"dynamic {path} for {client}\n".encode()
        return None

    server = serve(resolver)

    out = tmp_path / "node.cfg"
    tftp_hpa(server.port, "get", "/pxelinux.cfg//01-52-54-00-12-34-56", str(out))
    assert out.read_bytes() == b"dynamic pxelinux.cfg/01-52-54-00-12-34-56 for 127.0.0.1\n"

    out = tmp_path / "default"
    assert curl(server.port, "pxelinux.cfg/./default", out).returncode == 0
    assert out.read_bytes() == b"dynamic pxelinux.cfg/default for 127.0.0.1\n"

    out = tmp_path / "dos"
    assert atftp(server.port, "pxelinux.cfg\\dos", out, "tsize 0").returncode == 0
    assert out.read_bytes() == b"dynamic pxelinux.cfg/dos for 127.0.0.1\n"

    # The resolver wins over a static file of the same name; None falls back to the disk.
    out = tmp_path / "grub.cfg"
    assert curl(server.port, "grub.cfg", out).returncode == 0
    assert out.read_bytes() == b"dynamic grub.cfg for 127.0.0.1\n"
    out = tmp_path / "pxelinux.0"
    assert curl(server.port, "pxelinux.0", out).returncode == 0
    assert out.read_bytes() == pxelinux

    assert calls == [
        ("pxelinux.cfg/01-52-54-00-12-34-56", "127.0.0.1"),
        ("pxelinux.cfg/default", "127.0.0.1"),
        ("pxelinux.cfg/dos", "127.0.0.1"),
        ("grub.cfg", "127.0.0.1"),
        ("pxelinux.0", "127.0.0.1"),
    ]


def test_missing_file_and_failing_resolver(
    serve: Factory, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    def resolver(path: str, client: str) -> bytes | None:
        if path == "broken":
            raise RuntimeError("inventory unavailable")
        return None

    server = serve(resolver)
    said = tftp_hpa(server.port, "get", "pxelinux.cfg/C0A80001", str(tmp_path / "x"))
    assert "Error code 1: File not found" in said
    said = tftp_hpa(server.port, "get", "broken", str(tmp_path / "y"))
    assert "Error code 0: Internal server error" in said
    assert wait_for_log(logs, r"path='pxelinux.cfg/C0A80001' bytes=0 outcome=refused: file")
    assert any("inventory unavailable" in (r.exc_text or "") for r in logs.records)


def test_netascii_mode(
    serve: Factory, root: Path, tmp_path: Path, raw_client: Callable[[int], RawClient]
) -> None:
    text = b"line one\nline two\r\nend\n"
    (root / "notes.txt").write_bytes(text)
    server = serve()
    out = tmp_path / "notes.txt"
    tftp_hpa(server.port, "get", "notes.txt", str(out), mode="ascii")
    assert out.read_bytes() == text  # tftp-hpa translates back

    client = raw_client(server.port)
    client.request("notes.txt", mode="netascii")
    block, data = client.data()
    assert (block, data) == (1, b"line one\r\nline two\r\0\r\nend\r\n")
    client.ack(1)


# -- options: blksize, tsize, timeout, windowsize --------------------------------------------


def test_blksize_and_tsize_with_curl(serve: Factory, root: Path, tmp_path: Path) -> None:
    data = put_random(root / "kernel", 3 * MiB + 123)
    server = serve()
    out = tmp_path / "kernel"
    done = curl(server.port, "kernel", out, "--tftp-blksize", "1468")
    assert done.returncode == 0, done.stderr
    assert f"tsize parsed from OACK ({len(data)})" in done.stderr
    assert "blksize parsed from OACK (1468) requested (1468)" in done.stderr
    assert out.read_bytes() == data


def test_blksize_is_used_for_every_block(
    serve: Factory, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    data = put_random(root / "initrd", 100 * 1428 + 77)
    server = serve()
    out = tmp_path / "initrd"
    done = atftp(server.port, "initrd", out, "blksize 1428", "tsize 0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.read_bytes() == data
    oack, blocks, acks = atftp_trace(done.stdout + done.stderr)
    assert oack == {"tsize": str(len(data)), "blksize": "1428"}
    assert [size for _, size in blocks] == [1428] * 100 + [77]
    assert [block for block, _ in blocks] == list(range(1, 102))
    assert acks == list(range(0, 102))  # no window: one ACK per block, ACK 0 for the OACK
    assert wait_for_log(logs, rf"path='initrd' bytes={len(data)} outcome=ok blksize=1428")


def test_blksize_of_exact_multiple_ends_with_empty_block(
    serve: Factory, root: Path, tmp_path: Path
) -> None:
    data = put_random(root / "even", 4 * 1024)
    server = serve()
    done = atftp(server.port, "even", tmp_path / "even", "blksize 1024")
    assert done.returncode == 0
    _, blocks, _ = atftp_trace(done.stdout + done.stderr)
    assert [size for _, size in blocks] == [1024, 1024, 1024, 1024, 0]
    assert (tmp_path / "even").read_bytes() == data


def test_windowsize_with_atftp(
    serve: Factory, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    data = put_random(root / "vmlinuz", 3 * MiB)
    server = serve()
    out = tmp_path / "vmlinuz"
    done = atftp(server.port, "vmlinuz", out, "blksize 1428", "tsize 0", "windowsize 8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.read_bytes() == data
    oack, blocks, acks = atftp_trace(done.stdout + done.stderr)
    assert oack == {"tsize": str(len(data)), "windowsize": "8", "blksize": "1428"}
    nblocks = len(data) // 1428 + 1
    assert [block for block, _ in blocks] == list(range(1, nblocks + 1))
    # One ACK per window of 8 blocks (and ACK 0 for the OACK, and one for the last block).
    assert acks == [*range(0, nblocks, 8), nblocks]
    assert wait_for_log(logs, r"path='vmlinuz' bytes=3145728 outcome=ok .* windowsize=8")


def test_block_numbers_wrap_around(serve: Factory, root: Path, tmp_path: Path) -> None:
    data = put_random(root / "big", 70000 * 8 + 3)  # 70001 blocks of 8 bytes > 65535
    server = serve()
    out = tmp_path / "big"
    done = run(
        "atftp", "--get", "-r", "big", "-l", str(out), "--option", "blksize 8",
        "--option", "windowsize 64", HOST, str(server.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == data


def test_window_is_sent_before_the_first_ack(
    serve: Factory, root: Path, raw_client: Callable[[int], RawClient]
) -> None:
    data = put_random(root / "ten-blocks", 9 * 512 + 100)
    server = serve()
    client = raw_client(server.port)
    client.request("ten-blocks", windowsize=4, tsize=0, timeout=5)  # no retransmits here
    assert client.oack() == {"windowsize": "4", "tsize": str(len(data)), "timeout": "5"}
    client.ack(0)
    received: dict[int, bytes] = {}

    def window(expected: list[int]) -> None:
        for block in expected:
            number, payload = client.data()
            assert number == block
            received[number] = payload
        assert client.silent(0.3), "the server waits for an ACK after a full window"

    window([1, 2, 3, 4])  # four DATA packets before any ACK
    client.ack(2)  # as if block 3 was lost: RFC 7440 resends from block 3
    window([3, 4, 5, 6])
    client.ack(6)
    window([7, 8, 9, 10])
    client.ack(6)  # a duplicate ACK is ignored: no Sorcerer's Apprentice resend
    assert client.silent(0.3)
    client.ack(10)
    assert client.silent(0.3)
    assert b"".join(received[n] for n in range(1, 11)) == data


def test_options_are_validated_and_clamped(
    serve: Factory, root: Path, raw_client: Callable[[int], RawClient]
) -> None:
    put_random(root / "f", 1000)
    server = serve()

    client = raw_client(server.port)
    client.request("f", blksize=70000, windowsize=1000, timeout=0, tsize=0, colour="blue")
    assert client.oack() == {"blksize": "65464", "windowsize": "64", "tsize": "1000"}
    client.ack(0)
    assert client.data() == (1, (root / "f").read_bytes())
    client.ack(1)

    client = raw_client(server.port)
    client.request("f", blksize=4, windowsize="many", timeout=300)  # all invalid: ignored
    assert client.data()[0] == 1  # no OACK: plain RFC 1350 transfer
    client.ack(1)

    client = raw_client(server.port)
    client.request("f", timeout=2, blksize=600)
    assert client.oack() == {"timeout": "2", "blksize": "600"}
    client.ack(0)
    assert client.data() == (1, (root / "f").read_bytes()[:600])
    client.ack(1)
    assert client.data() == (2, (root / "f").read_bytes()[600:])
    client.ack(2)


def test_unacknowledged_window_is_retransmitted(
    serve: Factory, root: Path, raw_client: Callable[[int], RawClient]
) -> None:
    data = put_random(root / "f", 3 * 512 + 1)
    server = serve()
    client = raw_client(server.port)
    client.request("f", windowsize=2, timeout=1)
    assert client.oack() == {"windowsize": "2", "timeout": "1"}
    assert client.oack() == {"windowsize": "2", "timeout": "1"}  # OACK resent, no ACK 0
    client.ack(0)
    first = [client.data(), client.data()]
    assert [client.data(), client.data()] == first  # the whole window again after 1 s
    client.ack(2)
    rest = [client.data(), client.data()]
    client.ack(4)
    assert b"".join(p for _, p in first + rest) == data


def test_stray_packet_gets_unknown_tid(
    serve: Factory, root: Path, raw_client: Callable[[int], RawClient]
) -> None:
    data = put_random(root / "f", 700)
    server = serve()
    client = raw_client(server.port)
    client.request("f")
    assert client.data() == (1, data[:512])
    assert client.tid is not None
    stranger = raw_client(server.port)
    stranger.sock.sendto(struct.pack("!HH", 4, 1), client.tid)
    stranger.tid = client.tid
    assert stranger.error() == (5, "Unknown transfer ID")
    client.ack(1)  # the real client's transfer goes on
    assert client.data() == (2, data[512:])
    client.ack(2)


# -- refusals --------------------------------------------------------------------------------


def test_path_traversal_is_refused(
    serve: Factory, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    (root / "passwd-link").symlink_to("/etc/passwd")
    (root / "secret-link").symlink_to(tmp_path / "secret.txt")
    (root / "etc-link").symlink_to("/etc")
    (root / "sub").mkdir()
    (root / "sub" / "relative-link").symlink_to("../../secret.txt")
    forbidden = (Path("/etc/passwd").read_bytes(), b"top secret")
    attempts = [
        "../../etc/passwd",
        "/../etc/passwd",
        "..\\..\\etc\\passwd",
        "../secret.txt",
        "sub/../../secret.txt",
        "/./../secret.txt",
        "passwd-link",
        "secret-link",
        "etc-link/passwd",
        "sub/relative-link",
        "..",
        "/",
    ]
    server = serve()
    for i, name in enumerate(attempts):
        out = tmp_path / f"hpa-{i}"
        said = tftp_hpa(server.port, "get", name, str(out))
        assert "Error code 2: Access violation" in said, name
        assert not_served(out, *forbidden), name
        out = tmp_path / f"atftp-{i}"
        done = atftp(server.port, name, out, "tsize 0")
        assert done.returncode != 0 and "Access violation" in done.stdout + done.stderr, name
        assert not_served(out, *forbidden), name
    refused = wait_for_log(logs, r"outcome=refused: access violation", 2 * len(attempts))
    assert len(refused) == 2 * len(attempts)
    levels = {r.levelno for r in logs.records if "outcome=refused" in r.getMessage()}
    assert levels == {logging.WARNING}
    assert any("client=127.0.0.1:" in r and "'..\\\\..\\\\etc\\\\passwd'" in r for r in refused)


def test_symlink_inside_the_root_is_served(serve: Factory, root: Path, tmp_path: Path) -> None:
    data = put_random(root / "images" / "real.img", 5000)
    (root / "current.img").symlink_to("images/real.img")
    server = serve()
    out = tmp_path / "current.img"
    assert curl(server.port, "current.img", out).returncode == 0
    assert out.read_bytes() == data


def test_write_requests_are_refused(
    serve: Factory, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"x" * 3000)
    (root / "existing").write_bytes(b"keep me")
    server = serve()
    said = tftp_hpa(server.port, "put", str(upload), "new.bin")
    assert "Error code 2: Access violation" in said
    said = tftp_hpa(server.port, "put", str(upload), "existing")
    assert "Error code 2: Access violation" in said
    done = run("atftp", "--put", "-l", str(upload), "-r", "other.bin", HOST, str(server.port))
    assert done.returncode != 0
    assert "Access violation" in done.stdout + done.stderr
    done = run("curl", "-sS", "-T", str(upload), f"tftp://{HOST}:{server.port}/curl.bin")
    assert done.returncode != 0
    assert sorted(p.name for p in root.iterdir()) == ["existing"]
    assert (root / "existing").read_bytes() == b"keep me"
    warnings = wait_for_log(logs, r"refused: write request", 4)
    assert any("client=127.0.0.1:" in w and "path='new.bin'" in w for w in warnings)


# -- concurrency and stopping ----------------------------------------------------------------


def test_twenty_concurrent_curl_clients(
    serve: Factory, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    data = put_random(root / "rootfs.img", MiB)
    server = serve()
    outs = [tmp_path / f"out-{i}" for i in range(20)]
    url = f"tftp://{HOST}:{server.port}/rootfs.img"
    argv = ["curl", "-sS", "--tftp-blksize", "1468", "-o"]
    procs = [subprocess.Popen([*argv, str(out), url], stdin=subprocess.DEVNULL) for out in outs]
    try:
        codes = [proc.wait(timeout=RUN_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert codes == [0] * 20
    assert all(out.read_bytes() == data for out in outs)
    assert len(wait_for_log(logs, r"path='rootfs.img' bytes=1048576 outcome=ok", 20)) == 20


def test_stop_ends_transfers_and_frees_the_port(
    root: Path, raw_client: Callable[[int], RawClient]
) -> None:
    put_random(root / "f", 10000)
    server = TftpServer(root, None, host=HOST, port=0)
    server.stop()  # before start: nothing to do
    with pytest.raises(RuntimeError):
        server.start()

    server = TftpServer(root, None, host=HOST, port=0)
    server.start()
    try:
        port = server.port
        assert port > 0
        client = raw_client(port)
        client.request("f")
        assert client.data()[0] == 1  # the transfer is now waiting for an ACK
        before = time.monotonic()
        server.stop()
        assert time.monotonic() - before < 2
        assert client.error() == (0, "Server shutting down")
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("corral-tftp")]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, port))  # the port is free again


# -- boot steps ------------------------------------------------------------------------------


def test_transfers_are_recorded_as_the_nodes_boot_steps(
    fixture_cluster: None,
    settings: Settings,
    root: Path,
    tmp_path: Path,
    raw_client: Callable[..., RawClient],
) -> None:
    """With corral's resolver and recorder, as corral serve runs them: each boot file a
    real client fetched is an event on the node at that address (or whose MAC the file
    names), through the events API; a failed transfer too, a size probe not."""
    here = host_address()
    with db.inventory() as inv:
        inv.add("node", [NodeSpec(name="lo1", interfaces=[{"mac": LO1_MAC, "ip": here}])])
    service = BootService(settings, db.engine())
    put_random(root / "ipxe.efi", 1_000_000)
    server = TftpServer(root, service.tftp_resolve, host=here, port=0, on_done=service.tftp_done)
    server.timeout, server.retries = 1, 1
    server.start()
    try:
        said = tftp_hpa(server.port, "get", "ipxe.efi", str(tmp_path / "a"), host=here)
        assert "Received 1000000 bytes" in said
        said = tftp_hpa(server.port, "get", "undionly.kpxe", str(tmp_path / "b"), host=here)
        assert "File not found" in said
        menu = tmp_path / "menu"
        assert (
            curl(server.port, "pxelinux.cfg/01-52-54-00-00-00-01", menu, host=here).returncode == 0
        )
        assert curl(server.port, "pxelinux.cfg/C0A80001", tmp_path / "c", host=here).returncode != 0
        probe = raw_client(server.port, here)  # a PXE ROM asks for the size, then aborts
        probe.request("ipxe.efi", tsize=0)
        assert probe.oack() == {"tsize": "1000000"}
        assert probe.tid is not None
        probe.sock.sendto(struct.pack("!HH", 5, 8) + b"size known\0", probe.tid)
        gone = raw_client(server.port, here)  # a client that takes one block and is gone
        gone.request("ipxe.efi")
        assert gone.data()[0] == 1
        with TestClient(create_app(service, "admin-secret")) as api:
            deadline = time.monotonic() + 15
            while len(lo1 := boot_events(api, "lo1")) < 3:
                assert time.monotonic() < deadline, lo1
                time.sleep(0.1)
            assert lo1 == [
                ("loader", "ipxe.efi over TFTP (1.0 MB)", here),
                ("loader", "undionly.kpxe over TFTP failed: file not found", here),
                ("loader", "ipxe.efi over TFTP failed: timeout after 1 retransmissions", here),
            ]
            assert boot_events(api, "c01") == [
                (
                    "boot-config",
                    "pxelinux.cfg/01-52-54-00-00-00-01 over TFTP (" + size(menu) + ")",
                    here,
                )
            ]
    finally:
        server.stop()


LO1_MAC = "52:54:00:00:01:27"


def host_address() -> str:
    """An IPv4 address of this machine that is not a loopback one: a node's reserved
    address must be a host's, and the clients' transfers then come from it."""
    out = run("ip", "-4", "-o", "addr", "show", "scope", "global").stdout
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    if found is None:
        pytest.skip("this machine has no IPv4 address but loopback")
    return found.group(1)


def size(path: Path) -> str:
    return f"{path.stat().st_size} B"


def boot_events(api: TestClient, node: str) -> list[tuple[str, str, str]]:
    answer = api.get(
        f"/api/v1/events?node={node}", headers={"Authorization": "Bearer admin-secret"}
    )
    assert answer.status_code == 200, answer.text
    return [(e["phase"], e["message"], e["source"]) for e in answer.json()]
