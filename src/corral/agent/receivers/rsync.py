"""The ``rsync`` receiver: the image's tree, straight into the target. A node that already
holds an older version receives only the differences, which is why the installer keeps
its filesystems then."""

from __future__ import annotations

import logging
import os
import re
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers.base import Job, Received, Receiver
from corral.agent.receivers.tools import output_tail
from corral.agent.run import spawn, stop

log = logging.getLogger("corral.agent")

#: Paths in the target that ``rsync --delete`` must leave alone: the filesystem's own
#: lost+found and the installer's layout stamp (see :mod:`corral.agent.disk`) with its
#: directory.
RSYNC_PROTECT = ("/lost+found", "/etc/corral/", "/etc/corral/layout.json")
#: ``--info=progress2`` lines: "  1,234,567  42%  10.00MB/s  0:00:01 (xfr#3, to-chk=5/9)"
_PROGRESS2 = re.compile(rb"^\s*([\d,.]+)\s+\d+%")
_STAT = re.compile(
    r"^(Number of regular files transferred|Total file size|Literal data|"
    r"Matched data|Total bytes received|Number of deleted files): ([\d,.]+)"
)


def parse_progress2(line: bytes) -> int | None:
    """The byte count of one ``--info=progress2`` line, or None for other lines."""
    match = _PROGRESS2.match(line)
    if not match:
        return None
    digits = match.group(1).replace(b",", b"").replace(b".", b"")
    return int(digits) if digits.isdigit() else None


def parse_stats(text: str) -> dict[str, int]:
    """The counts of ``rsync --stats`` that tell what was sent: ``files``, ``literal``
    (bytes sent as data), ``matched``, ``received``, ``deleted``, ``size``."""
    keys = {
        "Number of regular files transferred": "files",
        "Total file size": "size",
        "Literal data": "literal",
        "Matched data": "matched",
        "Total bytes received": "received",
        "Number of deleted files": "deleted",
    }
    stats: dict[str, int] = {}
    for line in text.splitlines():
        match = _STAT.match(line.strip())
        if match:
            digits = match.group(2).replace(",", "").replace(".", "")
            if digits.isdigit():
                stats[keys[match.group(1)]] = int(digits)
    return stats


class RsyncReceiver(Receiver):
    """``rsync -aHAX --numeric-ids --delete`` of the image's tree into the target."""

    name = "rsync"
    incremental = True

    #: seconds rsync may go without a byte of output before it is given up
    stall_timeout = 600.0

    def expected_bytes(self, plan: Plan) -> int:
        return plan.image.tree_bytes

    def argv(self, plan: Plan, target_dir: Path) -> list[str]:
        url = str(plan.transport.params.get("url", ""))
        if not url:
            raise ReceiveError("transport rsync: the plan has no 'url'")
        if not url.endswith("/"):
            url += "/"  # the tree's content, not a directory of that name
        argv = ["rsync", "-aHAX", "--numeric-ids", "--delete", "--info=progress2", "--stats"]
        argv += [f"--filter=P {path}" for path in RSYNC_PROTECT]
        # a file system's mount point (the ESP's /boot/efi, which images lack) cannot be
        # deleted: rsync's attempt failed the whole transfer with EBUSY
        argv += [f"--filter=P {path}" for path in self.context.mount_points]
        return [*argv, url, f"{target_dir}/"]

    def _run(
        self,
        argv: list[str],
        errors: IO[bytes],
        seen: Callable[[bytes], None],
        cancel_event: threading.Event,
        url: str,
    ) -> int:
        """Run rsync, handing each line of its output to ``seen`` (progress2 lines end
        in a carriage return); its exit code."""
        proc = spawn(
            argv,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=dict(os.environ, LC_ALL="C"),
        )
        out = proc.stdout
        assert out is not None
        pending = b""
        last_output = time.monotonic()
        try:
            while True:
                if cancel_event.is_set():
                    raise Cancelled()
                ready, _, _ = select.select([out], [], [], self.context.poll)
                if not ready:
                    if time.monotonic() - last_output > self.stall_timeout:
                        raise ReceiveError(
                            f"rsync: no progress for {self.stall_timeout:.0f} s from {url}"
                        )
                    continue
                data = os.read(out.fileno(), 1 << 16)
                if not data:
                    break
                last_output = time.monotonic()
                *complete, pending = re.split(rb"[\r\n]", pending + data)
                for line in complete:
                    seen(line)
            seen(pending)
            return proc.wait()
        finally:
            stop(proc)
            out.close()

    def receive(self, job: Job) -> Received:
        argv = self.argv(job.plan, job.target)
        total = job.plan.image.tree_bytes
        log.info("+ %s", " ".join(argv))
        count = 0
        lines: list[bytes] = []

        def seen(line: bytes) -> None:
            nonlocal count
            value = parse_progress2(line)
            if value is not None:
                count = max(count, value)
                job.progress(count, total)
            elif line.strip():
                lines.append(line)

        with tempfile.TemporaryFile() as errors:
            code = self._run(argv, errors, seen, job.cancel, str(job.plan.transport.params["url"]))
            complaints = output_tail(errors, 1000)
        for line in complaints.split(" / ") if complaints else []:
            log.info("rsync: %s", line)
        if code != 0:
            raise ReceiveError(f"rsync exited with {code}: {complaints[-300:]}")
        text = b"\n".join(lines).decode("utf-8", "replace")
        for line in text.splitlines():
            log.debug("rsync: %s", line)
        stats = parse_stats(text)
        log.info(
            "rsync: %d files transferred, %d bytes of data sent, %d matched",
            stats.get("files", 0),
            stats.get("literal", 0),
            stats.get("matched", 0),
        )
        job.progress(count, total)
        return Received(count, stats)
