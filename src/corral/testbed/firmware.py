"""The "firmware" of a testbed node: what PXE and iPXE do for an image install, in Python.

``corral testbed power NODE on`` runs this inside the node's network namespace::

    python -m corral.testbed.firmware --server URL --node tb001 --disk /dev/loop3 --dir DIR

A real node would DHCP, fetch iPXE, run its script and boot the deploy ramdisk, whose init
unpacks the token initrd and starts the agent. Booting a kernel per node would cost the
host far more than the transports the testbed exists to measure, so this module keeps only
the parts whose behaviour matters to corral: it fetches the node's token initrd from the
server (refused with 403 unless the node is armed, and only to the node's own address),
unpacks the token, writes the kernel command line the boot script would have given, and
execs the real agent in its place, so that the agent keeps this process's pid.

Standard library only, like the agent: the process is the node's and shares nothing with
the server but HTTP.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

#: Where the deploy ramdisk finds its token, inside the token initrd.
TOKEN_PATH = "etc/corral/node-token"
RETRY_SECONDS = 2.0


class BootFailed(Exception):
    """The node could not boot: no token within the timeout, or a broken token initrd."""


def say(message: str) -> None:
    """One console line, as a serial console would show it (the testbed keeps them)."""
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} firmware: {message}", flush=True)


def read_newc(data: bytes) -> dict[str, bytes]:
    """Regular files of a ``newc`` cpio archive, by path (corral.cpio only writes them)."""
    files: dict[str, bytes] = {}
    offset = 0
    while offset + 110 <= len(data):
        header = data[offset : offset + 110]
        if header[:6] not in (b"070701", b"070702"):
            raise BootFailed(f"bad cpio header at byte {offset}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = offset + 110 + namesize
        name = data[offset + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        end = start + size
        if end > len(data):
            raise BootFailed(f"cpio entry {name} runs past the end of the archive")
        if name == "TRAILER!!!":
            break
        if mode & 0o170000 == 0o100000:
            files[name.removeprefix("./")] = data[start:end]
        offset = end + (-end % 4)
    return files


def fetch_token(server: str, node: str, timeout: float, *, retry: float = RETRY_SECONDS) -> bytes:
    """The node's token initrd; waits (every ``retry`` s) while the server refuses it."""
    url = f"{server.rstrip('/')}/boot/token/{urllib.parse.quote(node, safe='')}.cpio.gz"
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=15) as answer:
                data: bytes = answer.read()
            say(f"GET {url}: 200, {len(data)} bytes")
            return data
        except urllib.error.HTTPError as exc:
            status = f"{exc.code} {exc.reason}"
            detail = exc.read().decode(errors="replace")[:200]
            # 403 while the node is not armed: iPXE would boot the local disk; we wait for
            # the deployment to arm it, which is the case the testbed exists for.
            what = f"GET {url}: {status} {detail}".rstrip()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            what = f"GET {url}: {reason}"
        if what != last:
            say(f"{what}; retrying every {retry:g} s")
            last = what
        if time.monotonic() + retry > deadline:
            raise BootFailed(f"no token for {node} after {timeout:g} s (last: {what})")
        time.sleep(retry)


def kernel_cmdline(server: str, node: str) -> str:
    """What corral's iPXE script puts on the deploy ramdisk's command line."""
    return f"corral.server={server} corral.node={node} corral.mode=deploy corral.agent_exit=exit"


def agent_argv(agent: Sequence[str], directory: Path, disk: str, interface: str) -> list[str]:
    return [
        *agent,
        "--cmdline", str(directory / "cmdline"),
        "--token-file", str(directory / "token"),
        "--log-file", str(directory / "agent.log"),
        "--run-dir", str(directory / "run"),
        "--interface", interface,
        "--disk", disk,
        "--work-dir", str(directory / "target"),
    ]  # fmt: skip


def boot(args: argparse.Namespace) -> list[str]:
    """Everything before the agent; returns the agent's argv."""
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("run", "target"):
        (directory / name).mkdir(exist_ok=True)
    say(f"{args.node}: network boot from {args.server} (disk {args.disk})")
    archive = fetch_token(args.server, args.node, args.timeout, retry=args.retry)
    try:
        files = read_newc(gzip.decompress(archive))
    except (OSError, EOFError) as exc:
        raise BootFailed(f"token initrd is not a gzip'd cpio archive: {exc}") from None
    token = files.get(TOKEN_PATH)
    if not token:
        raise BootFailed(f"token initrd holds no {TOKEN_PATH}")
    fd = os.open(directory / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token)
    (directory / "cmdline").write_text(kernel_cmdline(args.server, args.node) + "\n")
    agent = shlex.split(args.agent) if args.agent else [sys.executable, "-m", "corral.agent"]
    return agent_argv(agent, directory, args.disk, args.interface)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-testbed-firmware", description=__doc__)
    parser.add_argument("--server", required=True, help="corral's URL")
    parser.add_argument("--node", required=True)
    parser.add_argument("--disk", required=True, help="the node's disk (a loop device)")
    parser.add_argument("--dir", type=Path, required=True, help="the node's own files")
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--timeout", type=float, default=600.0, help="wait this long for a token")
    parser.add_argument("--retry", type=float, default=RETRY_SECONDS, help="seconds between tries")
    parser.add_argument("--agent", help="agent command (default: this python -m corral.agent)")
    args = parser.parse_args(argv)
    try:
        command = boot(args)
    except BootFailed as exc:
        say(f"boot failed: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    say(f"starting the agent: {shlex.join(command)}")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        say(f"boot failed: cannot run {command[0]}: {exc.strerror}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
