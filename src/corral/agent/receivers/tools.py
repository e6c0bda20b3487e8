"""The receivers' few helpers around the tools they run (zstd, tar, rsync, udp-receiver)."""

from __future__ import annotations

from typing import IO


def output_tail(stream: IO[bytes] | None, lines: int = 3) -> str:
    """The last lines a tool wrote to ``stream`` (a temporary file), on one line."""
    if stream is None:
        return ""
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:])
