"""The receivers' few helpers around the tools they run (zstd, tar, rsync, udp-receiver)."""

from __future__ import annotations

import subprocess
from typing import IO


def output_tail(stream: IO[bytes] | None, lines: int = 3) -> str:
    """The last lines a tool wrote to ``stream`` (a temporary file), on one line."""
    if stream is None:
        return ""
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate ``proc`` if it still runs, then kill it; reap it either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
