"""corral node add|set|show|list|rm"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    settings,
)
from corral.cli.entities import add_common_verbs
from corral.errors import InvalidValue
from corral.inventory.clusterfile import offset_ip, offset_mac
from corral.inventory.noderange import expand, fold
from corral.inventory.schema import InstallMethod, NodeSpec, parse

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


@dataclass(frozen=True)
class NodeOptions:
    """What ``node add`` or ``node set`` was given, read and checked."""

    names: list[str]
    macs: list[str | None]  # one per node, like ips
    ips: list[str | None]
    interface: str  # the interface that mac, ip and address apply to
    address: dict[str, Any]  # netmask, gateway, vlan, bond_members: those given
    fields: dict[str, Any]  # profiles, groups, install_method, netboot: those given
    variables: dict[str, Any]  # --var, parsed


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
    if mac:
        try:
            return [offset_mac(mac, i) for i in range(len(names))]
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
    return [None] * len(names)


def _ips(names: list[str], ip: str | None) -> list[str | None]:
    if not ip:
        return [None] * len(names)
    try:
        return [offset_ip(ip, i) for i in range(len(names))]
    except ValueError:
        raise InvalidValue(f"invalid IPv4 address '{ip}'") from None


def _interface(node: dict[str, Any], name: str) -> dict[str, Any]:
    for iface in node["interfaces"]:
        if iface["name"] == name:
            return dict(iface)
    return {"name": name}


def _with_node_options(apply: Callable[[NodeOptions], None]) -> Callable[..., None]:
    """The command that takes a node range and every node option and calls ``apply`` with
    them read: ``add`` and ``set`` differ only in what they do with them."""

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
    ) -> None:
        names = expand(noderange)
        given = NodeOptions(
            names=names,
            macs=_macs(names, mac, mac_file),
            ips=_ips(names, ip),
            interface=interface,
            address=changes(netmask=netmask, gateway=gateway, vlan=vlan, bond_members=bond_member),
            fields=changes(
                profiles=profile, groups=group, install_method=install_method, netboot=netboot
            ),
            variables=parse_vars(var),
        )
        apply(given)

    command.__name__, command.__doc__ = apply.__name__, apply.__doc__
    return command


@app.command("add")
@_with_node_options
def add(given: NodeOptions) -> None:
    """Add nodes: corral node add 'n[001-100]' --ip 10.0.0.11 --mac-file macs.txt

    Quote a noderange: the shell would expand n[001-100] as a file name pattern.
    """
    specs = []
    for name, mac, ip in zip(given.names, given.macs, given.ips, strict=True):
        iface = {"name": given.interface, **changes(mac=mac, ip=ip), **given.address}
        data = {"name": name, "interfaces": [iface], **given.fields}
        if given.variables:
            data["variables"] = given.variables
        specs.append(parse(NodeSpec, data, f"node {name}"))
    with inventory() as inv:
        inv.add("node", specs)
    out.print(f"added {len(specs)} node{'s' if len(specs) != 1 else ''}: {fold(given.names)}")


@app.command("set")
@_with_node_options
def set_(given: NodeOptions) -> None:
    """Change nodes; --profile/--group replace the lists, --var merges keys.

    The nodes are rendered with the change, as `corral sync` would render them: a change
    that breaks one (a profile whose snippet needs a variable it lacks) is refused.
    """
    from corral.render.check import before_change, refuse_breaking_change

    names, interface = given.names, given.interface
    with inventory() as inv:
        before = before_change(inv.session, names)
        specs = []
        nodes = zip(inv.specs("node", names), given.macs, given.ips, strict=True)
        for current, mac, ip in nodes:
            data = current.model_dump(mode="json")
            iface_changes = dict(given.address, **changes(mac=mac, ip=ip))
            if iface_changes:
                iface = {**_interface(data, interface), **iface_changes}
                others = [i for i in data["interfaces"] if i["name"] != interface]
                position = next(
                    (n for n, i in enumerate(data["interfaces"]) if i["name"] == interface),
                    len(others),
                )
                data["interfaces"] = [*others[:position], iface, *others[position:]]
            data.update(given.fields)
            if given.variables:
                data["variables"] = {**data["variables"], **given.variables}
            specs.append(parse(NodeSpec, data, f"node {current.name}"))
        outcomes = inv.put("node", specs)
        if "changed" in outcomes:
            what = f"node {names[0]}" if len(names) == 1 else f"nodes {fold(names)}"
            refuse_breaking_change(settings(), inv.session, before, what)
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
