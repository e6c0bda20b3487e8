"""Fakes that several test modules share: corral's chunk route, as the agent's receivers
see it through ``Client.download`` (their HTTP catch-up)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
