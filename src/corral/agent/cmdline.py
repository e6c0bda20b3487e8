"""The kernel command line: what corral's boot script tells the agent."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Values of ``corral.agent_exit=``: what the agent does once its work is done.
EXIT_ACTIONS = ("wait", "poweroff", "reboot", "exit")


def parse_cmdline(text: str) -> dict[str, str]:
    """``key=value`` words of a kernel command line (``flag`` alone maps to ``""``).

    Double quotes group words as the kernel does (``key="a b"``); the last of repeated
    keys wins. Words after a lone ``--`` belong to init and are skipped.
    """
    words: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for char in text:
        if char == '"':
            quoted = not quoted
            started = True
        elif char.isspace() and not quoted:
            if started:
                words.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    result: dict[str, str] = {}
    for word in words:
        if word == "--":
            break
        key, _, value = word.partition("=")
        if key:
            result[key] = value
    return result


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("", "1", "y", "yes", "true", "on")


@dataclass(frozen=True)
class BootOrders:
    """What the command line asks of the agent; every field may be missing."""

    server: str | None = None
    node: str | None = None
    mode: str | None = None
    discover: bool = False
    agent_exit: str = "wait"
    #: MAC of the NIC the machine booted from (``BOOTIF=01-aa-bb-...``), if given.
    boot_mac: str | None = None
    #: ``corral.disk=``: the disk to install on, over the plan's choice
    disk: str | None = None
    #: ``corral.interface=``: the NIC to talk through, used as it is configured
    interface: str | None = None
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_cmdline(cls, text: str) -> BootOrders:
        args = parse_cmdline(text)
        server = args.get("corral.server", "").strip().rstrip("/") or None
        exit_action = args.get("corral.agent_exit", "wait").strip().lower() or "wait"
        if exit_action not in EXIT_ACTIONS:
            exit_action = "wait"
        mode = args.get("corral.mode", "").strip() or None
        return cls(
            server=server,
            node=args.get("corral.node", "").strip() or None,
            mode=mode,
            discover=_flag(args.get("corral.discover")) or mode == "discover",
            agent_exit=exit_action,
            boot_mac=_bootif_mac(args.get("BOOTIF")),
            disk=args.get("corral.disk", "").strip() or None,
            interface=args.get("corral.interface", "").strip() or None,
            raw=args,
        )


def _bootif_mac(value: str | None) -> str | None:
    """``01-52-54-00-12-34-56`` (pxelinux's BOOTIF, ARP type 1 first) -> ``52:54:00:12:34:56``."""
    if not value:
        return None
    parts = value.lower().replace(":", "-").split("-")
    if len(parts) == 7:
        parts = parts[1:]
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        return None
    try:
        for p in parts:
            int(p, 16)
    except ValueError:
        return None
    return ":".join(parts)
