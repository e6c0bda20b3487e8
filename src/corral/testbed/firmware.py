"""The "firmware" of a testbed node: what PXE and iPXE do for an image install, in Python.

``corral testbed power NODE on`` runs this inside the node's network namespace::

    python -m corral.testbed.firmware --server URL --node tb001 --mac MAC \
        --disk /dev/loop3 --dir DIR

The same goes for a diskless node (its kernel and initramfs are not fetched either), whose
agent runs in a mount namespace of its own: it mounts the squashfs and the overlay there,
and they are gone with it; only the image's init is not started.

A real node DHCPs, loads iPXE, which fetches ``/boot/ipxe`` from corral, chains to its own
script and runs it: ``kernel`` with the command line, ``initrd`` for the deploy ramdisk and
the token, ``boot``. This module does the same over HTTP: it fetches the very scripts
``corral serve`` renders for the node and interprets them as iPXE would, so that what the
testbed's agent is told cannot drift from what a real node's is. Only the kernel and the
ramdisk image are not fetched: booting a kernel per node would cost the host far more than
the transports the testbed exists to measure, so the agent runs from this host's Python
instead; every other initrd (the node's token) is fetched and unpacked as the kernel would.

A script that boots the local disk (``exit``: the node is not armed) means there is nothing
to install: the firmware asks again every ``--retry`` seconds, as a node that keeps being
power-cycled would, until ``--timeout``. The agent is exec'd in this process's place (it
keeps the pid), told ``--exit exit``: a network namespace has no machine to reboot; the
testbed's power command is its reboot.

Standard library only, like the agent: the process is the node's and shares nothing with
the server but HTTP.
"""

from __future__ import annotations

import argparse
import gzip
import os
import posixpath
import re
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Where the deploy ramdisk finds its token, inside the token initrd.
TOKEN_PATH = "etc/corral/node-token"
RETRY_SECONDS = 2.0
#: The ramdisk images the testbed does not fetch (the deploy ramdisk, a diskless node's
#: kernel and initramfs): its agent runs from the host's Python.
RAMDISK_PATHS = ("/corral/ramdisk/", "/corral/diskless/")


class BootFailed(Exception):
    """The node could not boot: nothing to boot within the timeout, or a broken script
    or initrd."""


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


def fetch(url: str, trace: list[str]) -> bytes:
    """GET ``url``, noted in ``trace``; raises :class:`Refused` for an HTTP error, OSError
    when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=15) as answer:
            data: bytes = answer.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:200]
        raise Refused(f"GET {url}: {exc.code} {exc.reason} {detail}".rstrip()) from None
    trace.append(f"GET {url}: 200, {len(data)} bytes")
    return data


class Refused(Exception):
    """The server answered with an HTTP error."""


@dataclass
class Boot:
    """What an iPXE script told the machine to boot; ``local`` for ``exit``."""

    kernel: str = ""
    cmdline: str = ""
    #: (name, URL) of each ``initrd``, the name iPXE gives it (``--name`` or the basename)
    initrds: list[tuple[str, str]] = field(default_factory=list)
    local: bool = False


def expand(text: str, mac: str) -> str:
    """The iPXE settings a corral script may use, as iPXE expands them for this NIC."""
    values = {
        "net0/mac": mac,
        "mac": mac,
        "net0/mac:hexhyp": mac.replace(":", "-"),
        "mac:hexhyp": mac.replace(":", "-"),
        "platform": "pcbios",
        "buildarch": "x86_64",
    }

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise BootFailed(f"the boot script uses ${{{name}}}, which this firmware lacks")
        return values[name]

    return re.sub(r"\$\{([^}]+)\}", one, text)


def interpret(
    script: str, mac: str, base: str, trace: list[str] | None = None
) -> tuple[Boot, str | None]:
    """Run an iPXE script up to ``boot``, ``exit`` or ``chain``: (what to boot, the URL
    to chain to or None). Commands that only talk (``echo``) or set up nothing corral
    uses are skipped; any other command fails the boot, as it would on a real node."""
    lines = script.splitlines()
    if not lines or not lines[0].startswith("#!ipxe"):
        raise BootFailed(f"not an iPXE script: {lines[0][:60] if lines else '(empty)'!r}")
    boot = Boot()
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = expand(line, mac).split()
        command, args = words[0], words[1:]
        if command == "echo":
            if trace is not None:
                trace.append(f"script: {' '.join(args)}")
        elif command == "exit":
            boot.local = True
            return boot, None
        elif command == "chain":
            return boot, urllib.parse.urljoin(base, args[-1])
        elif command == "kernel" and args:
            boot.kernel = urllib.parse.urljoin(base, args[0])
            boot.cmdline = " ".join(args[1:])
        elif command == "initrd" and args:
            name = args[args.index("--name") + 1] if "--name" in args else ""
            url = urllib.parse.urljoin(base, args[-1])
            boot.initrds.append((name or posixpath.basename(urllib.parse.urlsplit(url).path), url))
        elif command == "boot":
            if not boot.kernel:
                raise BootFailed(f"line {number}: boot without a kernel")
            return boot, None
        else:
            raise BootFailed(f"line {number}: {command}: not a command this firmware knows")
    raise BootFailed("the boot script ended without boot, exit or chain")


def boot_script(server: str, mac: str, trace: list[str]) -> Boot:
    """Follow the boot chain from ``/boot/ipxe``, the URL corral's DHCP hands iPXE."""
    url = f"{server.rstrip('/')}/boot/ipxe"
    for _ in range(8):
        script = fetch(url, trace).decode(errors="replace")
        boot, chained = interpret(script, mac, url, trace)
        if chained is None:
            return boot
        url = chained
    raise BootFailed("the boot script chains more than 8 times")


def load_initrds(boot: Boot, trace: list[str]) -> dict[str, bytes]:
    """The files of every initrd but the ramdisk image the testbed stands in for, merged
    as the kernel merges them into its root."""
    files: dict[str, bytes] = {}
    for name, url in boot.initrds:
        if any(path in url for path in RAMDISK_PATHS):
            continue
        data = fetch(url, trace)
        try:
            files.update(read_newc(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data))
        except (OSError, EOFError) as exc:
            raise BootFailed(f"initrd {name} is not a cpio archive: {exc}") from None
    return files


def network_boot(server: str, mac: str, timeout: float, retry: float) -> tuple[Boot, bytes]:
    """The boot the server gives this node and its token, waiting (every ``retry`` s)
    while the node boots its local disk or the server is unreachable or refuses."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        trace: list[str] = []
        try:
            boot = boot_script(server, mac, trace)
            if boot.local:
                what = "the boot script boots the local disk: not armed for an install"
            else:
                files = load_initrds(boot, trace)
                token = files.get(TOKEN_PATH)
                if token:
                    for line in trace:
                        say(line)
                    return boot, token
                what = f"no initrd of the boot script holds {TOKEN_PATH}"
        except Refused as exc:
            what = str(exc)
        except (urllib.error.URLError, OSError) as exc:
            what = f"{server}: {getattr(exc, 'reason', exc)}"
        if what != last:  # each new answer is said once, not at every retry
            for line in trace:
                say(line)
            say(f"{what}; asking again every {retry:g} s")
            last = what
        if time.monotonic() + retry > deadline:
            raise BootFailed(f"nothing to boot after {timeout:g} s (last: {what})")
        time.sleep(retry)


def agent_argv(
    agent: Sequence[str], directory: Path, disk: str, interface: str, diskless: bool = False
) -> list[str]:
    """The agent's command; a diskless boot's gets a mount namespace of its own, where it
    mounts the squashfs and the overlay as a node's ramdisk would (they go with it)."""
    private = ["unshare", "--mount", "--propagation", "private", "--"] if diskless else []
    return [
        *private,
        *agent,
        "--cmdline", str(directory / "cmdline"),
        "--token-file", str(directory / "token"),
        "--log-file", str(directory / "agent.log"),
        "--run-dir", str(directory / "run"),
        "--interface", interface,
        "--disk", disk,
        "--work-dir", str(directory / "target"),
        "--newroot", str(directory / "newroot"),
        "--exit", "exit",
    ]  # fmt: skip


def boot(args: argparse.Namespace) -> list[str]:
    """Everything before the agent; returns the agent's argv."""
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("run", "target"):
        (directory / name).mkdir(exist_ok=True)
    say(f"{args.node}: network boot of {args.mac} from {args.server} (disk {args.disk})")
    booted, token = network_boot(args.server, args.mac, args.timeout, args.retry)
    say(f"booting {booted.kernel} {booted.cmdline}")
    fd = os.open(directory / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token)
    (directory / "cmdline").write_text(booted.cmdline + "\n")
    agent = shlex.split(args.agent) if args.agent else [sys.executable, "-m", "corral.agent"]
    diskless = "corral.mode=diskless" in booted.cmdline.split()
    return agent_argv(agent, directory, args.disk, args.interface, diskless)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-testbed-firmware", description=__doc__)
    parser.add_argument("--server", required=True, help="corral's URL")
    parser.add_argument("--node", required=True)
    parser.add_argument("--mac", required=True, help="the MAC of the node's boot NIC")
    parser.add_argument("--disk", required=True, help="the node's disk (a loop device)")
    parser.add_argument("--dir", type=Path, required=True, help="the node's own files")
    parser.add_argument("--interface", default="eth0")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="wait this long for an install to boot"
    )
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
