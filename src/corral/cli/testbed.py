"""corral testbed up|down|status|power: a virtual cluster in network namespaces."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from corral.cli.common import err, out, settings

app = typer.Typer(
    help="A virtual cluster in network namespaces, for tests and benchmarks.",
    no_args_is_help=True,
)


@app.command("up")
def up(
    nodes: int = typer.Option(..., "--nodes", help="number of nodes, 1-250 (tb001...)"),
    link: str = typer.Option("20mbit", help="each node's link rate, both directions"),
    server_link: str | None = typer.Option(None, help="the server's egress rate (default none)"),
    loss: str | None = typer.Option(None, help="packet loss towards the nodes, e.g. 1%"),
    slow: list[str] | None = typer.Option(
        None, "--slow", help="NODE=RATE: a slower link for a node or noderange (repeatable)"
    ),
    disk_size: str = typer.Option("1G", help="each node's loop-device disk (sparse)"),
    http_port: int = typer.Option(8080, help="port of the corral serve started in ctb-srv"),
    racks: int | None = typer.Option(
        None,
        help="split the nodes into R racks of consecutive nodes (r1, r2, ...), each on a "
        "bridge of its own behind one uplink to the server's; 1 to N racks, sizes differing "
        "by at most one node (the first N mod R racks get one more)",
    ),
    rack_uplink: str | None = typer.Option(
        None, help="each rack's uplink rate, both directions (needs --racks; default unshaped)"
    ),
) -> None:
    """Create the namespaces, links, disks and inventory nodes, and start corral serve."""
    from corral.testbed.cluster import Testbed, loss_text, summarize_racks, summarize_rates

    start = time.monotonic()
    with err.status("testbed: checking the options") as status:

        def progress(step: str) -> None:
            status.update(f"testbed: {step}")

        state = Testbed(settings(), progress=progress).up(
            nodes,
            link,
            server_link=server_link,
            loss=loss,
            slow=slow or [],
            disk_size=disk_size,
            http_port=http_port,
            racks=racks,
            rack_uplink=rack_uplink,
        )
    first, last = state.nodes[0], state.nodes[-1]
    server = f"server link {server_link}" if server_link else "server link unshaped"
    out.print(
        f"testbed up in {time.monotonic() - start:.1f} s: {len(state.nodes)} nodes "
        f"{first.name}..{last.name} ({first.ip}..{last.ip}), {summarize_rates(state)}, "
        f"{server}, loss {loss_text(state.loss)}, {disk_size} disks",
        markup=False,
    )
    if state.racks:
        out.print(summarize_racks(state), markup=False)
    out.print(f"corral serve at {state.server_url} (pid {state.server_pid})", markup=False)


@app.command("down")
def down(
    forget: bool = typer.Option(False, "--forget", help="also remove the nodes from the inventory"),
) -> None:
    """Stop everything, detach the disks, delete the namespaces (also after a crash)."""
    from corral.inventory.noderange import fold
    from corral.testbed.cluster import Testbed

    with err.status("testbed: going down") as status:
        report = Testbed(settings(), progress=lambda s: status.update(f"testbed: {s}")).down(
            forget=forget
        )
    out.print(
        f"testbed down: stopped {report.processes} processes, detached {report.loops} loop "
        f"devices, deleted {report.namespaces} namespaces",
        markup=False,
    )
    if report.forgotten:
        out.print(f"removed from the inventory: {fold(report.forgotten)}", markup=False)
    elif report.kept_nodes:
        out.print(
            f"inventory nodes kept: {fold(report.kept_nodes)} (remove them with --forget)",
            markup=False,
        )


@app.command("status")
def status() -> None:
    """The testbed's server, uplinks and nodes: address, disk, link rate, rack, what runs."""
    from corral.errors import CorralError
    from corral.run import pid_alive
    from corral.testbed.cluster import SERVER_NS, Testbed, format_rate, loss_text

    testbed = Testbed(settings())
    state = testbed.state
    if state is None:
        left = testbed.leftovers()
        if left:
            err.print(f"no testbed state, but {', '.join(left)}", markup=False)
            err.print("hint: run 'corral testbed down' to clean up", markup=False)
        else:
            out.print("no testbed is up", markup=False)
        return
    alive = state.server_pid is not None and pid_alive(state.server_pid)
    server_link = format_rate(state.server_link) if state.server_link else "unshaped"
    out.print(
        f"server {state.server_url or '-'} in {SERVER_NS} (pid {state.server_pid}, "
        f"{'running' if alive else 'NOT running'}), link {server_link}, "
        f"loss {loss_text(state.loss)}",
        markup=False,
    )
    if state.racks:
        try:
            counters = testbed.uplink_bytes()
        except CorralError as exc:
            err.print(f"warning: {exc.message}", markup=False)
            counters = {}
        headers = ("rack", "nodes", "uplink", "bytes in", "bytes out")
        uplinks = Table(*headers, box=None, pad_edge=False)
        for rack in state.racks:
            members = state.rack_nodes(rack.name)
            moved = [f"{n:,}" for n in counters[rack.name]] if rack.name in counters else ["-"] * 2
            uplinks.add_row(
                rack.name,
                f"{members[0].name}..{members[-1].name}",
                format_rate(rack.uplink) if rack.uplink else "unshaped",
                *moved,
            )
        out.print(uplinks)
    columns = ["node", "ip", "mac", "disk", "link", *(["rack"] if state.racks else []), "power"]
    table = Table(*columns, box=None, pad_edge=False)
    for node in state.nodes:
        power, pids = testbed.node_power(node.name)
        running = f"{power} ({pids[0]})" if pids else power
        in_rack = [node.rack] if state.racks else []
        table.add_row(
            node.name, node.ip, node.mac, node.loop, format_rate(node.rate), *in_rack, running
        )
    out.print(table)


@app.command("power")
def power(
    node: str = typer.Argument(..., help="a testbed node, e.g. tb001"),
    action: str = typer.Argument(..., help="on, off or cycle"),
    home: Path | None = typer.Option(None, help="corral's home [$CORRAL_HOME]"),
) -> None:
    """Boot a node (on, cycle: its firmware fetches its token, then runs the agent) or
    power it off (kill what runs on it)."""
    from corral.config import load_settings
    from corral.testbed.cluster import Testbed

    pid = Testbed(load_settings(home) if home else settings()).power(node, action)
    if pid is None:
        out.print(f"{node}: off", markup=False)
    else:
        out.print(
            f"{node}: booting (pid {pid}), console log in testbed/nodes/{node}/", markup=False
        )
