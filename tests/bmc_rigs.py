"""Real BMC emulators for the power tests and bench/power.py, each started by a context
manager that ends it (by its process) on the way out:

- :func:`redfish_bmcs`: sushy-tools' Redfish emulator (:mod:`tests.redfish_emulator`)
  serving N fake systems behind HTTP basic authentication (an htpasswd file of bcrypt
  hashes, as the emulator requires), with a journal of the requests it got;
- :func:`ipmi_bmc`: one OpenIPMI ``ipmi_sim`` on a UDP port of 127.0.0.1 with a user and a
  password, whose chassis control (power and boot device) is a small script: powering on
  starts a real process (``sleep``), powering off ends it, and the power state read back
  is whether it runs; the boot device asked for is kept in a file.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.run import pid_alive, spawn, stop, stop_pids

EMULATOR = Path(__file__).with_name("redfish_emulator.py")
IPMI_SIM = shutil.which("ipmi_sim")
IPMITOOL = shutil.which("ipmitool")
USER = "admin"
PASSWORD = "Corral-bmc-7"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def system_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


@dataclass
class RedfishRig:
    url: str
    systems: list[str]
    journal_path: Path

    def journal(self) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        return [json.loads(line) for line in self.journal_path.read_text().splitlines()]


def _wait_for_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Redfish emulator did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


@contextmanager
def redfish_bmcs(
    directory: Path,
    count: int,
    *,
    users: dict[str, str] | None = None,
    answer_delay: float = 0.0,
    prompt: bool = True,
    bcrypt_rounds: int = 4,
) -> Iterator[RedfishRig]:
    """One emulator serving ``count`` systems (all off), users (name -> password) allowed.

    bcrypt at cost 4 (the least): the emulator checks the password of every request, and
    here one process stands in for many BMCs, each with a CPU of its own.
    """
    import bcrypt

    directory.mkdir(parents=True, exist_ok=True)
    users = users or {USER: PASSWORD}
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{name}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(bcrypt_rounds)).decode()}\n"
            for name, pw in users.items()
        )
    )
    systems = [system_id(i) for i in range(count)]
    fake = [
        {"uuid": s, "name": f"node{i}", "power_state": "Off",
         "nics": [{"mac": f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", "ip": "10.0.0.1"}]}
        for i, s in enumerate(systems)
    ]  # fmt: skip
    config = directory / "emulator.conf"
    config.write_text(
        f"SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {fake!r}\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
        f"SUSHY_EMULATOR_STATE_DIR = {str(directory / 'state')!r}\n"
    )
    port = free_tcp_port()
    journal = directory / "journal.jsonl"
    argv = [sys.executable, str(EMULATOR), "--config", str(config), "--port", str(port),
            "--journal", str(journal)]  # fmt: skip
    if answer_delay:
        argv += ["--answer-delay", str(answer_delay)]
    if prompt:
        argv.append("--prompt")
    log = directory / "emulator.log"
    with open(log, "wb") as out:
        proc = spawn(argv, stdout=out.fileno(), stderr=out.fileno())
    try:
        _wait_for_tcp(port, proc, log, 20)
        yield RedfishRig(f"http://127.0.0.1:{port}", systems, journal)
    finally:
        stop(proc)


@dataclass
class IpmiRig:
    name: str
    port: int
    directory: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running_pid(self) -> int | None:
        """The pid of the process that is this node's power, if it runs."""
        try:
            pid = int((self.directory / "on.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def boot_device(self) -> str | None:
        path = self.directory / "boot"
        return path.read_text().strip() if path.exists() else None

    def pids(self) -> list[int]:
        """Every process its power-on started."""
        path = self.directory / "pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []


#: ipmi_sim's chassis control: "CHASSIS NODE get power|boot ..." prints "power:1" (a
#: process runs) or "power:0", and "boot:DEV"; "CHASSIS NODE set power 1|0 boot DEV ..."
#: starts or ends that process, or keeps DEV.
CHASSIS = r"""#!/bin/sh
dir=$(dirname "$0")
running() { [ -s "$dir/on.pid" ] && kill -0 "$(cat "$dir/on.pid")" 2>/dev/null; }
shift
op=$1
shift
case $op in
get)
    for parm; do
        case $parm in
        power) if running; then echo power:1; else echo power:0; fi ;;
        boot) echo "boot:$(cat "$dir/boot" 2>/dev/null || echo default)" ;;
        esac
    done ;;
set)
    while [ $# -ge 2 ]; do
        case $1 in
        power)
            if [ "$2" = 1 ]; then
                if ! running; then
                    sleep 3600 </dev/null >/dev/null 2>&1 &
                    echo $! > "$dir/on.pid"
                    echo $! >> "$dir/pids"
                fi
            elif running; then
                kill "$(cat "$dir/on.pid")"
                rm -f "$dir/on.pid"
            fi ;;
        boot) echo "$2" > "$dir/boot" ;;
        esac
        shift 2
    done ;;
esac
"""


def _udp_bound(port: int) -> bool:
    """Whether a socket is bound to UDP ``port`` (of any address) on this machine."""
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(line.split()[1].endswith(f":{port:04X}") for line in lines)


@contextmanager
def ipmi_bmc(
    directory: Path, name: str, *, user: str = USER, password: str = PASSWORD
) -> Iterator[IpmiRig]:
    """One ipmi_sim serving IPMI 2.0 (lanplus, cipher suites up to 3: OpenIPMI's) on
    127.0.0.1, user ``user`` an administrator."""
    assert IPMI_SIM, "ipmi_sim is missing: apt-get install openipmi"
    directory.mkdir(parents=True, exist_ok=True)
    chassis = directory / "chassis"
    chassis.write_text(CHASSIS)
    chassis.chmod(0o755)
    port = free_udp_port()
    (directory / "lan.conf").write_text(
        f'name "{name}"\n'
        "set_working_mc 0x20\n"
        "  startlan 1\n"
        f"    addr 127.0.0.1 {port}\n"
        "    priv_limit admin\n"
        "    allowed_auths_callback none md2 md5 straight\n"
        "    allowed_auths_user none md2 md5 straight\n"
        "    allowed_auths_operator none md2 md5 straight\n"
        "    allowed_auths_admin none md2 md5 straight\n"
        "    guid a123456789abcdefa123456789abcdef\n"
        "  endlan\n"
        f'  chassis_control "{chassis} {name}"\n'
        f'  user 2 true "{user}" "{password}" admin 10 none md2 md5 straight\n'
    )
    (directory / "emu.cmd").write_text(
        "mc_setbmc 0x20\n"
        "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n"
        "mc_enable 0x20\n"
    )
    log = directory / "ipmi_sim.log"
    rig = IpmiRig(name, port, directory)
    with open(log, "wb") as out:
        proc = spawn(
            [IPMI_SIM, "-n", "-c", str(directory / "lan.conf"), "-f", str(directory / "emu.cmd"),
             "-s", str(directory / "state")],
            stdout=out.fileno(), stderr=out.fileno(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _udp_bound(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ipmi_sim did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield rig
    finally:
        stop(proc)
        stop_pids(rig.pids(), grace=2)


@contextmanager
def ipmi_bmcs(directory: Path, count: int) -> Iterator[list[IpmiRig]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(ipmi_bmc(directory / f"bmc{i}", f"node{i}")) for i in range(count)
        ]
