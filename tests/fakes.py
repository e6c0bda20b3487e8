"""Fakes that several test modules share: corral's chunk route, as the agent's receivers
see it through ``Client.download`` (their HTTP catch-up); an unpacker that keeps what it
is given; an image version's stream export and a plan for it, written from chunks."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from corral.agent.plan import Chunk, Disk, Identity, ImageInfo, Plan, TransportInfo
from corral.agent.receivers.stream import Unpacker
from corral.images.store import ImageVersion


class FakeDownload:
    """One answer of the chunk route: ``data`` from ``offset`` (a Range request), cut at
    ``cut`` if given (the connection drops there: the answer is not complete)."""

    def __init__(self, data: bytes, offset: int, cut: int | None = None) -> None:
        self.data = data[offset:] if cut is None else data[offset:cut]
        self.offset = offset
        self.cut = cut
        self.length = len(data) - offset

    @property
    def complete(self) -> bool:
        return self.cut is None

    def read(self, size: int = 65536) -> bytes:
        piece, self.data = self.data[:size], self.data[size:]
        return piece

    def __enter__(self) -> FakeDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class ChunkServer:
    """corral's chunk route (``.../chunks/NNNNNNNN.bin``), for the receivers' catch-up; its
    ``host`` and ``port`` are what a client's say."""

    chunks: list[bytes]
    corrupt: list[int] = field(default_factory=list)  # chunk served corrupt, once per entry
    cut: dict[int, int] = field(default_factory=dict)  # chunk -> where the first answer stops
    gets: list[int] = field(default_factory=list)  # the chunks asked for, in order
    requests: list[tuple[str, int]] = field(default_factory=list)  # (file name, first byte)
    host: str = "127.0.0.1"
    port: int = 9

    def download(self, url: str, *, start: int = 0, auth: bool = True) -> FakeDownload:
        name = url.rsplit("/", 1)[-1]
        index = int(name.split(".")[0])
        self.gets.append(index)
        self.requests.append((name, start))
        data = self.chunks[index]
        if index in self.corrupt:
            self.corrupt.remove(index)
            return FakeDownload(bytes([data[0] ^ 0xFF]) + data[1:], start)
        if index in self.cut:
            return FakeDownload(data, start, self.cut.pop(index))
        return FakeDownload(data, start)


class KeptUnpacker:
    """An unpacker that keeps what it is given (``writes``, in order; optionally slowly),
    and is its own factory: it stands in for a receiver's ``make_unpacker``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.writes: list[bytes] = []
        self.delay = delay
        self.finished = False
        self.aborted = False

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def __call__(self, target: Path) -> Unpacker:
        return cast(Unpacker, self)

    def write(self, data: bytes) -> None:
        time.sleep(self.delay)
        self.writes.append(data)

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True


def stream_version(
    path: Path, chunks: list[bytes], name: str = "img", version: int = 1
) -> ImageVersion:
    """An image version at ``path`` whose stream export is ``chunks`` (and nothing else)."""
    exports = path / "exports"
    (exports / "chunks").mkdir(parents=True)
    for i, data in enumerate(chunks):
        (exports / "chunks" / f"{i:08d}.bin").write_bytes(data)
    index = {
        "chunk_size": max(map(len, chunks)),
        "count": len(chunks),
        "size": sum(map(len, chunks)),
        "sha256": hashlib.sha256(b"".join(chunks)).hexdigest(),
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
    }
    (exports / "stream.json").write_text(json.dumps(index))
    return ImageVersion(name, version, path, path / "rootfs", {})


def stream_plan(
    chunks: list[bytes],
    transport: str,
    params: dict[str, Any],
    *,
    node: str = "n1",
    deployment: int = 7,
    ref: str = "img:1",
) -> Plan:
    """A plan to receive the stream ``chunks`` by ``transport`` (no disk, no identity:
    what a receiver needs of it)."""
    return Plan(
        deployment=deployment,
        node=node,
        image=ImageInfo(
            ref,
            hashlib.sha256(b"".join(chunks)).hexdigest(),
            sum(map(len, chunks)),
            max(map(len, chunks)),
            [Chunk(hashlib.sha256(c).hexdigest(), len(c)) for c in chunks],
            tree_bytes=1,
            files=1,
        ),
        transport=TransportInfo(transport, params),
        disk=Disk("", "gpt", []),
        identity=Identity(node, [], {}, [], None),
        bootloader="none",
        post_script="",
    )


def free_port() -> int:
    """A TCP port nobody listens on, on the loopback interface, for now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
