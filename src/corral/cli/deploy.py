"""corral deploy, corral deployment list|show|cancel"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import typer
from rich.table import Table

from corral.agent.phases import DONE, FINAL
from corral.cli.common import (
    cell,
    err,
    human_size,
    local_time,
    out,
    print_yaml,
    session,
    settings,
)
from corral.cli.watch import LocalFeed, run_view
from corral.deploy.diskless import squashfs_transports
from corral.deploy.store import RUNNING, Deployments, new_deployment
from corral.deploy.transports import names as transport_names
from corral.deploy.view import deployment_out
from corral.images.catalog import image_store
from corral.inventory import models as m
from corral.inventory.state import RUNNING as RUNNING_NODE
from corral.inventory.state import NodeStates

app = typer.Typer(help="Deployments: list, show and cancel them.", no_args_is_help=True)

#: Nodes shown with a bar of their own in the live view; the rest are counted by phase.
BARS = 24


def deploy(
    nodes: str = typer.Argument(..., metavar="NODERANGE", help="the nodes, e.g. 'n[001-100]'"),
    image: str | None = typer.Option(
        None, help="NAME or NAME:VERSION for every node [default: each node's profile image]"
    ),
    transport: str = typer.Option(
        "http",
        help=f"how the image travels: {', '.join(transport_names())}, or auto (picked from "
        "the node count and image size, by crossovers measured with bench/deploy.py)",
    ),
    wait: bool = typer.Option(False, "--wait", help="follow the deployment until it ends"),
) -> None:
    """Install an image on nodes: corral deploy 'n[001-100]' --image compute --wait

    Returns once the deployment is stored and its nodes armed; `corral serve` power-cycles
    them into a network boot through their power driver (see `corral node power`) and
    follows them. Exit status with --wait: 0 if every
    node is done, 1 if any failed.
    """
    with session() as s:
        ident = new_deployment(s, image_store(settings().home), nodes, image, transport)
        count = len(Deployments(s).get(ident).nodes)
    out.print(f"deployment {ident}: {count} node(s), transport {transport}")
    if wait:
        raise typer.Exit(follow(ident))


def boot(
    nodes: str = typer.Argument(..., metavar="NODERANGE", help="the nodes, e.g. 'n[001-100]'"),
    image: str | None = typer.Option(
        None, help="NAME or NAME:VERSION for every node [default: each node's profile image]"
    ),
    transport: str = typer.Option(
        "auto",
        help=f"how the squashfs travels: {', '.join(squashfs_transports())}, or auto (picked "
        "from the node count and image size)",
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="follow the nodes until they run (or fail)"
    ),
) -> None:
    """Boot diskless nodes into their image, from RAM: corral boot 'n[001-100]'

    Makes the image's squashfs export if it is missing, power-cycles the nodes through their
    power driver (without one, power them on yourself), sends them the squashfs
    in one session and follows them until their systemd reports running. Exit status: 0 if
    every node runs, 1 if any failed.
    """
    with session() as s:
        ident = new_deployment(
            s, image_store(settings().home), nodes, image, transport, kind="diskless"
        )
        row = Deployments(s).get(ident)
        names = [n.node for n in row.nodes]
        chosen = sorted({n.transport for n in row.nodes})
    out.print(f"boot {ident}: {len(names)} diskless node(s), transport {', '.join(chosen)}")
    if wait:
        status = follow(ident)
        if status == 0:
            status = until_running(names, settings().firstboot_timeout)
        raise typer.Exit(status)


def until_running(names: list[str], timeout: float, interval: float = 1.0) -> int:
    """Wait for the nodes' systemd to say they run; 0 if all do, 1 if any failed or is
    still silent after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    said: set[str] = set()
    with err.status("waiting for the nodes' systemd to report running"):
        while True:
            with session() as s:
                statuses = NodeStates(s).statuses(names)
            for st in statuses:
                if st.name not in said and st.state in (RUNNING_NODE, "failed"):
                    said.add(st.name)
                    out.print(f"  {st.name}: {st.state}: {st.message or ''}", markup=False)
            if len(said) == len(names) or time.monotonic() > deadline:
                break
            time.sleep(interval)
    silent = [n for n in names if n not in said]
    for name in silent:
        out.print(f"  {name}: no running report in {timeout:.0f} s (see its console)")
    failed = [st.name for st in statuses if st.state == "failed"]
    return 1 if failed or silent else 0


def _snapshot(ident: int) -> dict[str, Any]:
    with session() as s:
        return deployment_out(Deployments(s).get(ident))


def follow(ident: int, interval: float = 0.5) -> int:
    """The live view of ``corral watch --deployment`` until the deployment ends, read from
    the database; returns the exit status."""
    start = time.monotonic()
    data: dict[str, Any] = {}

    def ended() -> bool:
        data.update(_snapshot(ident))
        return bool(data["state"] != RUNNING)

    title = f"deployment {ident}"
    run_view(LocalFeed(ident), title, err, until=ended, poll=interval)
    if not err.is_terminal:
        # Rich ends a live display's last line only on a terminal.
        err.line()
    _summary(data, time.monotonic() - start)
    return 0 if data["state"] == "done" else 1


def _summary(data: dict[str, Any], elapsed: float) -> None:
    phases = Counter(n["phase"] for n in data["nodes"])
    out.print(
        f"deployment {data['id']} {data['state']} after {elapsed:.1f} s: "
        + ", ".join(f"{c} {p}" for p, c in sorted(phases.items())),
        markup=False,
    )
    for n in data["nodes"]:
        if n["phase"] in FINAL and n["phase"] != DONE:
            out.print(f"  {n['node']}: {n['phase']}: {n['message']}", markup=False)


@app.command("list")
def list_() -> None:
    """Recent deployments, newest first."""
    with session() as s:
        rows = Deployments(s).recent()
        table = Table("id", "kind", "state", "nodes", "image", "transport", "created", box=None)
        for d in rows:
            phases = Counter(n.phase for n in d.nodes)
            table.add_row(
                cell(d.id),
                cell(d.kind),
                cell(d.state),
                cell(
                    f"{len(d.nodes)} ({', '.join(f'{c} {p}' for p, c in sorted(phases.items()))})"
                ),
                cell(d.image or "(profiles)"),
                cell(d.transport),
                cell(local_time(d.created)),
            )
    out.print(table)


@app.command("show")
def show(
    ident: int = typer.Argument(..., metavar="ID"),
    log: str | None = typer.Option(None, "--log", metavar="NODE", help="print a node's log tail"),
    follow_: bool = typer.Option(False, "--follow", "-f", help="live view until it ends"),
) -> None:
    """A deployment and each node's phase, bytes and message."""
    if follow_:
        raise typer.Exit(follow(ident))
    with session() as s:
        store = Deployments(s)
        if log:
            row: m.DeploymentNode = store.member(ident, log)
            out.print(row.log_tail or "(no log received)", markup=False)
            return
        data = deployment_out(store.get(ident))
    nodes = data.pop("nodes")
    for key in ("created", "finished"):
        data[key] = local_time(data[key]) or None
    print_yaml(data)
    table = Table("node", "image", "phase", "bytes", "message", box=None)
    for n in nodes:
        done = f"{human_size(n['bytes'])}/{human_size(n['total'])}"
        table.add_row(*map(cell, (n["node"], n["image"], n["phase"], done, n["message"])))
    out.print(table)


@app.command("cancel")
def cancel(ident: int = typer.Argument(..., metavar="ID")) -> None:
    """Stop a running deployment; its nodes' agents stop at their next report."""
    with session() as s:
        going = Deployments(s).cancel(ident)
    out.print(f"deployment {ident} cancelled ({going} node(s) were still going)")
