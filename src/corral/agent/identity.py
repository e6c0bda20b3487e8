"""What makes the installed system this node: names, addresses, fstab, keys, passwords.

The image is the same for every node; these files are what differ. Each is written to a
temporary name next to it and renamed, so a node cut off halfway never boots with half a
file. Paths are relative to the installed root, which is never the ramdisk's own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from corral.agent.disk import Layout, Volume
from corral.agent.errors import InstallError
from corral.agent.plan import Identity, Interface

log = logging.getLogger("corral.agent")

_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NETWORKD_UNITS = ("lib/systemd/system", "usr/lib/systemd/system")


class IdentityError(InstallError):
    """The plan's identity cannot be written; the message is the one-line reason."""


def write_atomic(
    path: Path, data: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> None:
    """Write ``path`` through a temporary file in its directory, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.corral-tmp")
    raw = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if os.geteuid() == 0:  # as the agent is; tests may not be
            os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _exists(root: Path, *relatives: str) -> bool:
    return any(os.path.lexists(root / r) for r in relatives)


def prefix_length(netmask: str) -> int:
    """``255.255.255.0`` or ``24`` -> 24."""
    text = netmask.strip().lstrip("/")
    try:
        length = int(text) if text.isdigit() else ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise IdentityError(f"bad netmask {netmask!r}") from None
    if not 0 <= length <= 32:
        raise IdentityError(f"bad netmask {netmask!r}")
    return length


def _address(iface: Interface) -> str:
    assert iface.ip is not None
    try:
        ipaddress.IPv4Address(iface.ip)
    except ValueError:
        raise IdentityError(f"interface {iface.name}: bad address {iface.ip!r}") from None
    return f"{iface.ip}/{prefix_length(iface.netmask)}"


def short_name(hostname: str) -> str:
    return hostname.split(".", 1)[0]


def hostname_text(identity: Identity) -> str:
    return short_name(identity.hostname) + "\n"


def hosts_text(identity: Identity) -> str:
    """/etc/hosts: the node's name on its first static address, else on 127.0.1.1 as
    Debian does for machines whose address comes from DHCP."""
    names = identity.hostname
    if short_name(names) != names:
        names = f"{identity.hostname} {short_name(identity.hostname)}"
    static = next((i.ip for i in identity.interfaces if i.ip), None)
    lines = ["127.0.0.1\tlocalhost", f"{static or '127.0.1.1'}\t{names}", ""]
    lines += [
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
    ]
    return "\n".join(lines) + "\n"


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "if"


def networkd_files(identity: Identity) -> dict[str, str]:
    """``/etc/systemd/network`` files, one per interface, matched by MAC (names differ
    between the ramdisk and the installed system, MACs do not)."""
    files = {}
    for iface in identity.interfaces:
        match = f"MACAddress={iface.mac.lower()}" if iface.mac else f"Name={iface.name}"
        lines = [
            f"# Written by corral for {identity.hostname}: interface {iface.name}.",
            "[Match]",
            match,
            "",
            "[Network]",
        ]
        if iface.ip:
            lines.append(f"Address={_address(iface)}")
            if iface.gateway:
                lines.append(f"Gateway={iface.gateway}")
        else:
            lines.append("DHCP=ipv4")
        files[f"10-corral-{_file_name(iface.name)}.network"] = "\n".join(lines) + "\n"
    return files


def ifupdown_text(identity: Identity, interfaces_d: bool = True) -> str:
    lines = [f"# Written by corral for {identity.hostname}."]
    if interfaces_d:
        lines += ["source /etc/network/interfaces.d/*"]
    lines += ["", "auto lo", "iface lo inet loopback"]
    for iface in identity.interfaces:
        lines += ["", f"auto {iface.name}"]
        if iface.ip:
            lines.append(f"iface {iface.name} inet static")
            lines.append(f"    address {_address(iface)}")
            if iface.gateway:
                lines.append(f"    gateway {iface.gateway}")
        else:
            lines.append(f"iface {iface.name} inet dhcp")
    return "\n".join(lines) + "\n"


def networkmanager_files(identity: Identity) -> dict[str, str]:
    """NetworkManager keyfiles, for images (the dnf-built ones) that use it."""
    files = {}
    for iface in identity.interfaces:
        lines = [
            "[connection]",
            f"id=corral-{iface.name}",
            "type=ethernet",
            "autoconnect=true",
        ]
        if not iface.mac:
            lines.append(f"interface-name={iface.name}")
        lines += ["", "[ethernet]"]
        if iface.mac:
            lines.append(f"mac-address={iface.mac.upper()}")
        lines += ["", "[ipv4]"]
        if iface.ip:
            lines += ["method=manual", f"address1={_address(iface)}"]
            if iface.gateway:
                lines.append(f"gateway={iface.gateway}")
        else:
            lines.append("method=auto")
        lines += ["", "[ipv6]", "method=ignore"]
        files[f"corral-{_file_name(iface.name)}.nmconnection"] = "\n".join(lines) + "\n"
    return files


def fstab_text(volumes: Sequence[Volume]) -> str:
    """/etc/fstab by filesystem UUID; fsck order 1 for /, 2 for the others (0 for XFS
    and swap, which fsck does not check)."""
    lines = ["# /etc/fstab: written by corral's agent (filesystems by UUID)."]
    lines.append("# <file system>  <mount point>  <type>  <options>  <dump>  <pass>")
    mounted = sorted(
        (v for v in volumes if v.mounted), key=lambda v: (v.mount.rstrip("/").count("/"), v.mount)
    )
    for v in mounted:
        if v.fstype == "xfs":
            options, passno = "defaults", 0
        elif v.kernel_fstype == "vfat":
            options, passno = "umask=0077", 1 if v.mount == "/" else 2
        elif v.mount == "/":
            options, passno = "defaults,errors=remount-ro", 1
        else:
            options, passno = "defaults", 2
        lines.append(f"UUID={v.uuid}\t{v.mount}\t{v.kernel_fstype}\t{options}\t0\t{passno}")
    for v in volumes:
        if v.fstype == "swap":
            lines.append(f"UUID={v.uuid}\tnone\tswap\tsw\t0\t0")
    return "\n".join(lines) + "\n"


def shadow_with_root_password(text: str, password_hash: str, today: int) -> str:
    """``/etc/shadow`` with root's password field (and last change) replaced; a root
    line is added if there is none."""
    if any(c in password_hash for c in ":\n\r"):
        raise IdentityError("the root password hash contains ':' or a line break")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields += [""] * (9 - len(fields))
            fields[1], fields[2] = password_hash, str(today)
            lines[i] = ":".join(fields)
            break
    else:
        lines.insert(0, f"root:{password_hash}:{today}:0:99999:7:::")
    return "\n".join(lines) + "\n"


def _group_id(root: Path, name: str) -> int | None:
    try:
        for line in (root / "etc" / "group").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
                return int(fields[2])
    except OSError:
        pass
    return None


def _enable_networkd(root: Path) -> None:
    """Enable systemd-networkd the way ``systemctl enable`` would, for images with no
    other network manager (without it the .network files would do nothing)."""
    for units in _NETWORKD_UNITS:
        service = root / units / "systemd-networkd.service"
        if not service.exists():
            continue
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "systemd-networkd.service"
        if not os.path.lexists(link):
            link.symlink_to(f"/{units}/systemd-networkd.service")
        socket = root / units / "systemd-networkd.socket"
        sockets = root / "etc/systemd/system/sockets.target.wants"
        if socket.exists() and not os.path.lexists(sockets / socket.name):
            sockets.mkdir(parents=True, exist_ok=True)
            (sockets / socket.name).symlink_to(f"/{units}/{socket.name}")
        log.info("enabled systemd-networkd")
        return


def write_network(root: Path, identity: Identity) -> list[str]:
    """The network configuration in every form the image can use; the paths written."""
    written = []
    ifupdown = _exists(root, "etc/network/interfaces", "sbin/ifup", "usr/sbin/ifup")
    networkmanager = _exists(root, "etc/NetworkManager", "usr/sbin/NetworkManager")
    networkd_dir = root / "etc/systemd/network"
    for name in os.listdir(networkd_dir) if networkd_dir.is_dir() else []:
        if name.startswith("10-corral-") and name.endswith(".network"):
            (networkd_dir / name).unlink()  # from an earlier deployment
    for name, text in networkd_files(identity).items():
        write_atomic(networkd_dir / name, text)
        written.append(f"etc/systemd/network/{name}")
    if ifupdown:
        interfaces_d = (root / "etc/network/interfaces.d").is_dir()
        write_atomic(root / "etc/network/interfaces", ifupdown_text(identity, interfaces_d))
        written.append("etc/network/interfaces")
    if networkmanager:
        connections = root / "etc/NetworkManager/system-connections"
        for name, text in networkmanager_files(identity).items():
            write_atomic(connections / name, text, 0o600)
            written.append(f"etc/NetworkManager/system-connections/{name}")
    if not ifupdown and not networkmanager:
        _enable_networkd(root)
    return written


def write_ssh(root: Path, identity: Identity) -> list[str]:
    written = []
    for name, content in sorted(identity.ssh_host_keys.items()):
        if not _KEY_NAME.fullmatch(name):
            raise IdentityError(f"bad SSH host key file name {name!r}")
        text = content if content.endswith("\n") else content + "\n"
        write_atomic(root / "etc/ssh" / name, text, 0o644 if name.endswith(".pub") else 0o600)
        written.append(f"etc/ssh/{name}")
    if identity.authorized_keys:
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(ssh_dir, 0, 0)
        os.chmod(ssh_dir, 0o700)
        keys = "".join(k.strip() + "\n" for k in identity.authorized_keys if k.strip())
        write_atomic(ssh_dir / "authorized_keys", keys, 0o600)
        written.append("root/.ssh/authorized_keys")
    return written


def write_root_password(root: Path, password_hash: str) -> None:
    shadow = root / "etc/shadow"
    try:
        st = shadow.stat()
        text = shadow.read_text()
        mode, gid = st.st_mode & 0o7777, st.st_gid
    except FileNotFoundError:
        text, mode = "", 0o640
        gid = _group_id(root, "shadow") or 0
    today = int(time.time() // 86400)
    write_atomic(shadow, shadow_with_root_password(text, password_hash, today), mode, 0, gid)


def configure(root: Path, identity: Identity, layout: Layout | None) -> list[str]:
    """Write the node's identity into the installed root (a diskless node's overlay: no
    ``layout``, so no fstab); the paths written (relative)."""
    if not identity.hostname or "/" in identity.hostname or "\n" in identity.hostname:
        raise IdentityError(f"bad hostname {identity.hostname!r}")
    write_atomic(root / "etc/hostname", hostname_text(identity))
    write_atomic(root / "etc/hosts", hosts_text(identity))
    written = ["etc/hostname", "etc/hosts"]
    written += write_network(root, identity)
    # a diskless root is an overlay in RAM: the image's fstab may name its build's disks
    write_atomic(root / "etc/fstab", fstab_text(layout.volumes if layout else ()))
    written.append("etc/fstab")
    written += write_ssh(root, identity)
    if identity.root_password_hash:
        write_root_password(root, identity.root_password_hash)
        written.append("etc/shadow")
    if identity.machine_id and not re.fullmatch(r"[0-9a-f]{32}", identity.machine_id):
        raise IdentityError(f"bad machine-id {identity.machine_id!r}")
    # empty: systemd makes a new one at first boot, so no two nodes share it
    text = f"{identity.machine_id}\n" if identity.machine_id else ""
    write_atomic(root / "etc/machine-id", text, 0o444)
    written.append("etc/machine-id")
    log.info("identity of %s written: %s", identity.hostname, ", ".join(written))
    return written
