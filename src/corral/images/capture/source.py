"""The machine and directory to capture, and how SSH reaches it.

SSH runs with ``BatchMode`` (never a prompt), a connect timeout and keep-alives (a node
that dies mid-copy fails the capture within a minute), and its own known-hosts file
in corral's home with ``StrictHostKeyChecking=accept-new``: a node's host key is trusted on
first capture and checked afterwards, without touching the admin's ``~/.ssh``.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from corral.images.capture.errors import SourceError
from corral.inventory.schema import NodeSpec

_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


def is_address(text: str) -> bool:
    """Whether ``text`` is a literal IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def node_address(node: NodeSpec) -> str:
    """The address to reach an inventory node at: its first interface with an IP."""
    for interface in node.interfaces:
        if interface.ip:
            return str(interface.ip)
    raise SourceError(
        f"node '{node.name}' has no IP address in the inventory",
        f"give it one ('corral node set {node.name} --ip ADDRESS') or capture by address",
    )


@dataclass(frozen=True)
class Source:
    """The machine and directory to capture, and how to log in there.

    ``node`` is the inventory node ``host`` was looked up from (None: given literally).
    ``known_hosts`` is the file SSH trusts host keys from and adds new ones to (None: the
    user's own).
    """

    host: str
    path: str = "/"
    user: str = "root"
    port: int = 22
    key: Path | None = None
    known_hosts: Path | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        if not (is_address(self.host) or _HOST_NAME.fullmatch(self.host)):
            hint = "give an inventory node, a host name or an IP address"
            if "@" in self.host:
                hint = "give the login with --user, not as USER@HOST"
            raise SourceError(f"invalid host {self.host!r}", hint)
        if not _USER.fullmatch(self.user):
            raise SourceError(f"invalid user name {self.user!r}")
        if not 1 <= self.port <= 65535:
            raise SourceError(f"invalid SSH port {self.port}", "use 1 to 65535")
        if not self.path.startswith("/") or "\n" in self.path or "\0" in self.path:
            raise SourceError(
                f"invalid source path {self.path!r}", "give an absolute path on the node"
            )
        object.__setattr__(self, "path", posixpath.normpath(self.path).replace("//", "/"))

    @property
    def where(self) -> str:
        """``user@host`` (and the port when it is not 22), for messages."""
        port = f" port {self.port}" if self.port != 22 else ""
        return f"{self.user}@{self.host}{port}"

    @property
    def known_hosts_name(self) -> str:
        """How the host appears in a known-hosts file (``[host]:port`` off port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def rsync_source(self, relative: str = "") -> str:
        """An rsync source argument for the directory ``relative`` (below the source path),
        with the ``/./`` that ``-R`` keeps the path after."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = self.path.rstrip("/")
        return f"{self.user}@{host}:{base}/./{relative}"


def ssh_argv(source: Source) -> list[str]:
    """The ``ssh`` command (without destination) that every connection of a capture uses."""
    argv = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    if source.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={source.known_hosts}"]
    argv += ["-p", str(source.port)]
    if source.key is not None:
        argv += ["-i", str(source.key), "-o", "IdentitiesOnly=yes"]
    return argv


def ssh_env() -> dict[str, str]:
    """run() passes a small environment; ssh also needs the agent, if there is one."""
    env = {"LC_ALL": "C"}
    if "SSH_AUTH_SOCK" in os.environ:
        env["SSH_AUTH_SOCK"] = os.environ["SSH_AUTH_SOCK"]
    return env


def explain_ssh(stderr: str, source: Source) -> SourceError:
    """The error for an SSH connection that failed (ssh exits 255), naming the fix."""
    text = stderr.strip()
    where = source.where
    if re.search(r"Could not resolve hostname|Name or service not known|name resolution", text):
        hint = "check the node's address in the inventory ('corral node show NAME')"
        if source.node is None:
            hint = (
                f"'{source.host}' is neither an inventory node nor a name this machine "
                "resolves: see 'corral node list', or give an IP address"
            )
        return SourceError(f"cannot capture from {where}: unknown host", hint)
    if "Connection refused" in text:
        return SourceError(
            f"cannot capture from {where}: connection refused",
            f"is sshd running on the node, on port {source.port}? (--ssh-port)",
        )
    reachability = re.search(
        r"Connection timed out|Operation timed out|No route to host|Network is unreachable", text
    )
    if reachability:
        return SourceError(
            f"cannot capture from {where}: {reachability.group(0).lower()}",
            f"check that the node is up and that this machine reaches it (ping {source.host})",
        )
    if "IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        where_file = f" -f {source.known_hosts}" if source.known_hosts is not None else ""
        return SourceError(
            f"cannot capture from {where}: its SSH host key is not the one seen before",
            "if the node was reinstalled, forget the old key: "
            f"ssh-keygen -R '{source.known_hosts_name}'{where_file}",
        )
    if "Permission denied" in text or "Too many authentication failures" in text:
        key = f"{source.key} was refused" if source.key else "no --ssh-key was given"
        return SourceError(
            f"cannot capture from {where}: the node refused the login ({key})",
            f"give a key that {source.user}@{source.host} accepts (in its authorized_keys) "
            "with --ssh-key FILE, or another login with --user",
        )
    tail = " | ".join(text.splitlines()[-3:]) or "no message"
    return SourceError(f"cannot capture from {where}: ssh failed: {tail}")
