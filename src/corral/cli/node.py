"""corral node add|set|show|list|rm"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli.common import (
    ProfilesOption,
    VarsOption,
    cell,
    changes,
    inventory,
    out,
    parse_vars,
    read_text,
    session,
    settings,
)
from corral.cli.entities import add_common_verbs
from corral.cli.power import power_changes, with_power_options
from corral.errors import InvalidValue
from corral.inventory.noderange import expand, fold
from corral.inventory.nodes import (
    NodeChanges,
    consecutive_ips,
    consecutive_macs,
    edit_nodes,
    new_nodes,
)
from corral.inventory.schema import InstallMethod

app = typer.Typer(help="The machines of the cluster.", no_args_is_help=True)

Ip = Annotated[
    str | None, typer.Option(help="IP of the first node; the others get consecutive ones")
]
Mac = Annotated[
    str | None, typer.Option(help="MAC of the first node; the others get consecutive ones")
]
MacFile = Annotated[Path | None, typer.Option(help="file with one MAC per line, in node order")]
Interface = Annotated[
    str, typer.Option("--interface", help="interface the address options apply to")
]
Netmask = Annotated[str | None, typer.Option(help="netmask, e.g. 255.255.255.0 or 24")]
Gateway = Annotated[str | None, typer.Option(help="default gateway")]
Vlan = Annotated[int | None, typer.Option(help="VLAN id")]
BondMembers = Annotated[
    list[str] | None,
    typer.Option("--bond-member", help="member interface of this bond (repeatable)"),
]
Groups = Annotated[list[str] | None, typer.Option("--group", help="group (repeatable)")]
Method = Annotated[InstallMethod | None, typer.Option(help="kickstart, image or diskless")]
Netboot = Annotated[
    bool | None, typer.Option("--netboot/--no-netboot", help="boot from the network")
]


def _macs(names: list[str], mac: str | None, mac_file: Path | None) -> list[str | None]:
    if mac and mac_file:
        raise InvalidValue("give --mac or --mac-file, not both")
    if mac_file:
        macs = [line.strip() for line in read_text(mac_file, "MAC file").splitlines()]
        macs = [m for m in macs if m and not m.startswith("#")]
        if len(macs) != len(names):
            raise InvalidValue(
                f"{mac_file} has {len(macs)} MACs for {len(names)} nodes: give one per node"
            )
        return list(macs)
    return list(consecutive_macs(mac, len(names))) if mac else []


def _with_node_options(apply: Callable[[NodeChanges], None]) -> Callable[..., None]:
    """The command that takes a node range and every node option and calls ``apply`` with
    them read: ``add`` and ``set`` differ only in what they do with them."""

    @with_power_options
    def command(
        noderange: Annotated[
            str, typer.Argument(metavar="NODERANGE", help="the nodes, e.g. 'n[001-100]'")
        ],
        ip: Ip = None,
        mac: Mac = None,
        mac_file: MacFile = None,
        interface: Interface = "eth0",
        netmask: Netmask = None,
        gateway: Gateway = None,
        vlan: Vlan = None,
        bond_member: BondMembers = None,
        profile: ProfilesOption = None,
        group: Groups = None,
        var: VarsOption = None,
        install_method: Method = None,
        netboot: Netboot = None,
        *,
        power: dict[str, Any],
    ) -> None:
        names = expand(noderange)
        given = NodeChanges(
            names=names,
            macs=_macs(names, mac, mac_file),
            ips=consecutive_ips(ip, len(names)) if ip else [],
            interface=interface,
            address=changes(netmask=netmask, gateway=gateway, vlan=vlan, bond_members=bond_member),
            fields=changes(
                profiles=profile, groups=group, install_method=install_method, netboot=netboot
            ),
            variables=parse_vars(var),
            power=power_changes(power, names, fold(names)),
        )
        apply(given)

    command.__name__, command.__doc__ = apply.__name__, apply.__doc__
    return command


@app.command("add")
@_with_node_options
def add(given: NodeChanges) -> None:
    """Add nodes: corral node add 'n[001-100]' --ip 10.0.0.11 --mac-file macs.txt

    Quote a noderange: the shell would expand n[001-100] as a file name pattern.
    """
    specs = new_nodes(given)
    with inventory() as inv:
        inv.add("node", specs)
    out.print(f"added {len(specs)} node{'s' if len(specs) != 1 else ''}: {fold(given.names)}")


@app.command("set")
@_with_node_options
def set_(given: NodeChanges) -> None:
    """Change nodes; --profile/--group replace the lists, --var merges keys.

    The nodes are rendered with the change, as `corral sync` would render them: a change
    that breaks one (a profile whose snippet needs a variable it lacks) is refused.
    """
    from corral.render.check import checked_change

    names = list(given.names)
    what = f"node {names[0]}" if len(names) == 1 else f"nodes {fold(names)}"
    with inventory() as inv, checked_change(settings(), inv, "node", names, what):
        outcomes = edit_nodes(inv, given)
    changed = outcomes.count("changed")
    out.print(f"changed {changed} of {len(names)} nodes: {fold(names)}")


add_common_verbs(
    app,
    "node",
    {
        "ip": lambda n: ",".join(i.ip for i in n.interfaces if i.ip),
        "mac": lambda n: ",".join(i.mac for i in n.interfaces if i.mac),
        "groups": lambda n: ",".join(n.groups),
        "profiles": lambda n: ",".join(n.profiles),
        "method": lambda n: n.install_method.value,
        "netboot": lambda n: "yes" if n.netboot else "no",
    },
)


@app.command("reinstall")
def reinstall(
    noderange: str = typer.Argument(..., metavar="NODERANGE", help="the nodes to re-arm"),
) -> None:
    """Re-arm nodes: their next network boot installs them again."""
    from corral.inventory.state import NodeStates

    names = expand(noderange)
    with inventory() as inv:
        NodeStates(inv.session).arm(names)
    out.print(f"armed {len(names)} node{'s' if len(names) != 1 else ''} for install: {fold(names)}")


@app.command("status")
def status(
    noderange: str | None = typer.Argument(
        None, metavar="NODERANGE", help="only these, e.g. 'n[001-010]' (default: all)"
    ),
) -> None:
    """Install state, last phase and message of nodes."""
    import time

    from rich.table import Table

    from corral.inventory.state import NodeStates

    with inventory() as inv:
        rows = NodeStates(inv.session).statuses(expand(noderange) if noderange else None)
    table = Table("name", "state", "phase", "since", "message", box=None, pad_edge=False)
    for row in rows:
        since = time.strftime("%H:%M:%S", time.localtime(row.updated)) if row.updated else ""
        table.add_row(*map(cell, (row.name, row.state, row.phase, since, (row.message or "")[:60])))
    out.print(table)


@app.command("history")
def history(
    noderange: str | None = typer.Argument(
        None, metavar="NODERANGE", help="only these, e.g. 'n[001-010]' (default: all)"
    ),
    since: str | None = typer.Option(
        None, help="from a time (2026-12-03T12:00) or an age (15m, 2h, 7d) [default: all kept]"
    ),
    deployment: int | None = typer.Option(
        None, "--deployment", "-d", metavar="ID", help="only this deployment's events"
    ),
    unknown: bool = typer.Option(False, "--unknown", help="machines no node owns, by MAC"),
    limit: int = typer.Option(200, help="at most this many, the newest"),
    logs: bool = typer.Option(False, "--logs", help="with each failure's last log lines"),
) -> None:
    """The nodes' event history, oldest first: boot steps corral served, their reports,
    failures with their reason; kept for event_retention_days."""
    from rich.table import Table

    from corral.cli.common import local_time
    from corral.serve.events import stored_events
    from corral.serve.monitor import parse_since

    names = expand(noderange) if noderange else None
    with inventory() as inv:
        if names:
            for name in names:
                inv.node(name)  # an unknown one is an error, not an empty history
        rows = stored_events(
            inv.session,
            since=parse_since(since),
            nodes=[""] if unknown else names,
            deployment=deployment,
            newest=limit,
        )
    table = Table("time", "node", "phase", "source", "message", box=None, pad_edge=False)
    for row in rows:
        message = row.message
        if row.reason:
            message = f"[{row.reason}, in {row.during or '?'}] {message}"
        table.add_row(
            *map(cell, (local_time(row.time), row.node or row.mac, row.phase, row.source, message))
        )
        if logs and row.log:
            table.add_row("", "", "", "", cell(row.log.rstrip()))
    out.print(table if rows else "no events")


class _Action(StrEnum):
    ON = "on"
    OFF = "off"
    CYCLE = "cycle"
    STATUS = "status"


@app.command("power")
def power(
    action: _Action = typer.Argument(..., help="on, off, cycle or status"),
    noderange: str = typer.Argument(..., metavar="NODERANGE", help="the nodes, e.g. 'n[001-100]'"),
    netboot: bool = typer.Option(
        False, "--netboot", help="before on or cycle, set their next boot (only) to the network"
    ),
) -> None:
    """Power nodes on, off, cycle them, or read their power state, through their BMCs
    (power_pool at once, each within power_timeout). Exit 1 if any failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from corral.deploy.power import power_nodes

    names = expand(noderange)
    with inventory() as inv:
        inv.specs("node", names)  # an unknown node is an error before any BMC is asked
    with Progress(
        TextColumn(f"power {action.value}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=out,
        transient=True,
        disable=not out.is_terminal or len(names) < 4,
    ) as progress:
        task = progress.add_task("", total=len(names))
        outcomes = power_nodes(
            settings(),
            session,
            names,
            action.value,
            netboot=netboot,
            on_done=lambda _outcome: progress.advance(task),
        )
    table = Table("node", "driver", "result", "state", "time", "reason", box=None, pad_edge=False)
    for o in outcomes:
        result = "ok" if o.ok else f"FAILED ({o.why})"
        table.add_row(
            *map(cell, (o.node, o.driver, result, o.state or "", f"{o.seconds:.1f} s", o.reason))
        )
    out.print(table)
    failed = [o.node for o in outcomes if not o.ok]
    if failed:
        out.print(f"{len(failed)} of {len(outcomes)} failed: {fold(failed)}")
        raise typer.Exit(1)
