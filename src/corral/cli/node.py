"""corral node add|set|show|list|rm"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from corral.cli.common import changes, inventory, out, parse_vars, read_text
from corral.cli.entities import add_common_verbs
from corral.errors import InvalidValue
from corral.inventory.clusterfile import offset_ip, offset_mac
from corral.inventory.noderange import expand, fold
from corral.inventory.schema import InstallMethod, NodeSpec, parse

app = typer.Typer(help="The machines of the cluster.", no_args_is_help=True)

IpOpt = typer.Option(None, help="IP of the first node; the others get consecutive ones")
MacOpt = typer.Option(None, help="MAC of the first node; the others get consecutive ones")
MacFileOpt = typer.Option(None, help="file with one MAC per line, in node order")
IfOpt = typer.Option("eth0", "--interface", help="interface the address options apply to")
MaskOpt = typer.Option(None, help="netmask, e.g. 255.255.255.0 or 24")
GwOpt = typer.Option(None, help="default gateway")
VlanOpt = typer.Option(None, help="VLAN id")
BondOpt = typer.Option(None, "--bond-member", help="member interface of this bond (repeatable)")
ProfOpt = typer.Option(None, "--profile", help="profile, in order; ~NAME drops one (repeatable)")
GroupOpt = typer.Option(None, "--group", help="group (repeatable)")
VarOpt = typer.Option(None, "--var", help="KEY=VALUE (repeatable)")
MethodOpt = typer.Option(None, help="kickstart, image or diskless")
NetbootOpt = typer.Option(None, "--netboot/--no-netboot", help="boot from the network")


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


@app.command("add")
def add(
    noderange: str,
    ip: str | None = IpOpt,
    mac: str | None = MacOpt,
    mac_file: Path | None = MacFileOpt,
    interface: str = IfOpt,
    netmask: str | None = MaskOpt,
    gateway: str | None = GwOpt,
    vlan: int | None = VlanOpt,
    bond_member: list[str] | None = BondOpt,
    profile: list[str] | None = ProfOpt,
    group: list[str] | None = GroupOpt,
    var: list[str] | None = VarOpt,
    install_method: InstallMethod | None = MethodOpt,
    netboot: bool | None = NetbootOpt,
) -> None:
    """Add nodes: `corral node add n[001-100] --ip 10.0.0.11 --mac-file macs.txt`."""
    names = expand(noderange)
    macs, ips = _macs(names, mac, mac_file), _ips(names, ip)
    specs = []
    for name, node_mac, node_ip in zip(names, macs, ips, strict=True):
        iface = changes(
            name=interface,
            mac=node_mac,
            ip=node_ip,
            netmask=netmask,
            gateway=gateway,
            vlan=vlan,
            bond_members=bond_member,
        )
        data = changes(
            name=name,
            interfaces=[iface],
            profiles=profile,
            groups=group,
            variables=parse_vars(var) if var else None,
            install_method=install_method,
            netboot=netboot,
        )
        specs.append(parse(NodeSpec, data, f"node {name}"))
    with inventory() as inv:
        inv.add("node", specs)
    out.print(f"added {len(specs)} node{'s' if len(specs) != 1 else ''}: {fold(names)}")


@app.command("set")
def set_(
    noderange: str,
    ip: str | None = IpOpt,
    mac: str | None = MacOpt,
    mac_file: Path | None = MacFileOpt,
    interface: str = IfOpt,
    netmask: str | None = MaskOpt,
    gateway: str | None = GwOpt,
    vlan: int | None = VlanOpt,
    bond_member: list[str] | None = BondOpt,
    profile: list[str] | None = ProfOpt,
    group: list[str] | None = GroupOpt,
    var: list[str] | None = VarOpt,
    install_method: InstallMethod | None = MethodOpt,
    netboot: bool | None = NetbootOpt,
) -> None:
    """Change nodes; --profile/--group replace the lists, --var merges keys."""
    names = expand(noderange)
    macs, ips = _macs(names, mac, mac_file), _ips(names, ip)
    address = changes(netmask=netmask, gateway=gateway, vlan=vlan, bond_members=bond_member)
    with inventory() as inv:
        specs = []
        for current, node_mac, node_ip in zip(inv.specs("node", names), macs, ips, strict=True):
            data = current.model_dump(mode="json")
            iface_changes = dict(address, **changes(mac=node_mac, ip=node_ip))
            if iface_changes:
                iface = {**_interface(data, interface), **iface_changes}
                others = [i for i in data["interfaces"] if i["name"] != interface]
                position = next(
                    (n for n, i in enumerate(data["interfaces"]) if i["name"] == interface),
                    len(others),
                )
                data["interfaces"] = [*others[:position], iface, *others[position:]]
            data.update(
                changes(
                    profiles=profile, groups=group, install_method=install_method, netboot=netboot
                )
            )
            if var:
                data["variables"] = {**data["variables"], **parse_vars(var)}
            specs.append(parse(NodeSpec, data, f"node {current.name}"))
        outcomes = inv.put("node", specs)
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
def reinstall(noderange: str) -> None:
    """Re-arm nodes: their next network boot installs them again."""
    from corral.inventory.state import NodeStates

    names = expand(noderange)
    with inventory() as inv:
        NodeStates(inv.session).arm(names)
    out.print(f"armed {len(names)} node{'s' if len(names) != 1 else ''} for install: {fold(names)}")


@app.command("status")
def status(noderange: str | None = typer.Argument(None, metavar="NODERANGE")) -> None:
    """Install state, last phase and message of nodes."""
    import time

    from rich.table import Table

    from corral.inventory.state import NodeStates

    with inventory() as inv:
        rows = NodeStates(inv.session).statuses(expand(noderange) if noderange else None)
    table = Table("name", "state", "phase", "since", "message", box=None, pad_edge=False)
    for row in rows:
        since = time.strftime("%H:%M:%S", time.localtime(row.updated)) if row.updated else ""
        table.add_row(row.name, row.state, row.phase or "", since, (row.message or "")[:60])
    out.print(table)
