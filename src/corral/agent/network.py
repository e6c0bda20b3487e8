"""Bringing the boot NIC up: busybox ``udhcpc`` and the event script it runs."""

from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path

from corral.agent.errors import AgentError

#: ioctl that reads an interface's IPv4 address (linux/sockios.h).
_SIOCGIFADDR = 0x8915

#: The udhcpc event script; ``@LEASE_DIR@`` and ``@RESOLV@`` are filled in at run time.
UDHCPC_SCRIPT = r"""#!/bin/sh
# corral agent: udhcpc event script. Configures the address, the default route and
# resolv.conf, and leaves the lease in @LEASE_DIR@/lease-<interface> for the agent.
lease_dir=@LEASE_DIR@
resolv=@RESOLV@
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface" 2>/dev/null
    ip link set dev "$interface" up
    rm -f "$lease_dir/lease-$interface"
    ;;
  bound|renew)
    [ "$1" = bound ] && ip -4 addr flush dev "$interface" 2>/dev/null
    ip addr add "$ip/${mask:-24}" dev "$interface" 2>/dev/null
    if [ -n "$router" ]; then
      n=0
      while [ "$n" -lt 20 ] && ip route del default dev "$interface" 2>/dev/null; do
        n=$((n + 1))
      done
      for gw in $router; do
        ip route add default via "$gw" dev "$interface" && break
      done
    fi
    if [ -n "$dns" ]; then
      {
        [ -n "$domain" ] && echo "search $domain"
        for ns in $dns; do echo "nameserver $ns"; done
      } > "$resolv.tmp" && mv "$resolv.tmp" "$resolv"
    fi
    lease="$lease_dir/lease-$interface"
    {
      echo "interface=$interface"
      echo "ip=$ip"
      echo "mask=${mask:-}"
      echo "router=${router:-}"
      echo "dns=${dns:-}"
      echo "domain=${domain:-}"
      echo "hostname=${hostname:-}"
      echo "serverid=${serverid:-}"
    } > "$lease.tmp" && mv "$lease.tmp" "$lease"
    ;;
esac
exit 0
"""


class NetworkError(AgentError):
    """No interface could be brought up."""


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def write_udhcpc_script(run_dir: Path, resolv: Path) -> Path:
    """Write the udhcpc event script into ``run_dir`` and return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "udhcpc.sh"
    text = UDHCPC_SCRIPT.replace("@LEASE_DIR@", _sh_quote(str(run_dir))).replace(
        "@RESOLV@", _sh_quote(str(resolv))
    )
    script.write_text(text)
    script.chmod(0o755)
    return script


def read_lease(run_dir: Path, interface: str) -> dict[str, str] | None:
    """What the event script recorded for ``interface`` (None without a lease)."""
    try:
        text = (run_dir / f"lease-{interface}").read_text()
    except OSError:
        return None
    lease = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            lease[key] = value.strip()
    return lease if lease.get("ip") else None


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface ``name`` right now, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            packed = struct.pack("256s", name.encode()[:15])
            data = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, packed)
    except OSError:
        return None
    return socket.inet_ntoa(data[20:24])


def has_default_route(proc: Path) -> bool:
    """A default IPv4 route through an interface other than lo (from /proc/net/route)."""
    try:
        lines = (proc / "net" / "route").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[0] != "lo" and fields[1] == "00000000":
            return True
    return False


def raise_rmem_max(wanted: int, proc: Path = Path("/proc")) -> int:
    """Let a socket ask for ``wanted`` bytes of receive buffer: raise the kernel's
    ``net.core.rmem_max`` to it if it is lower. The limit it ends at, which is lower than
    ``wanted`` when the kernel refuses (a network namespace cannot change it)."""
    path = proc / "sys" / "net" / "core" / "rmem_max"
    try:
        limit = int(path.read_text())
    except (OSError, ValueError):
        return 0
    if limit >= wanted:
        return limit
    try:
        path.write_text(f"{wanted}\n")
    except OSError:
        return limit
    return wanted


def source_address(host: str, port: int) -> str | None:
    """The local address the kernel would use to reach ``host`` (nothing is sent)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(infos[0][4])
            return str(sock.getsockname()[0])
    except (OSError, IndexError):
        return None
