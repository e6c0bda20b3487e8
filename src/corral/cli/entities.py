"""The verbs every inventory noun shares: show, list, rm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.table import Table

from corral.cli.common import cell, inventory, out, print_yaml
from corral.inventory.noderange import expand, fold
from corral.inventory.store import Kind


def add_common_verbs(
    app: typer.Typer, kind: Kind, columns: dict[str, Callable[[Any], str]], show: bool = True
) -> None:
    noun = "NODERANGE" if kind == "node" else "NAME"

    def show_(name: str = typer.Argument(..., help=f"the {kind}'s name")) -> None:
        """Print one entry as YAML, as the cluster file holds it."""
        with inventory() as inv:
            spec = inv.get(kind, name)
        print_yaml(spec.model_dump(mode="json", exclude_defaults=True))

    if show:
        app.command("show")(show_)

    @app.command("list")
    def list_(
        names: str | None = typer.Argument(
            None,
            metavar=noun,
            help="only these, e.g. 'n[001-010]' (default: all)"
            if kind == "node"
            else "only these: NAME[,NAME...] (default: all)",
        ),
    ) -> None:
        """List entries as a table."""
        with inventory() as inv:
            specs = inv.specs(kind, expand(names) if names else None)
        table = Table("name", *columns, box=None, pad_edge=False)
        for spec in specs:
            table.add_row(cell(spec.name), *(cell(fn(spec)) for fn in columns.values()))
        out.print(table)

    @app.command("rm")
    def rm(names: str = typer.Argument(..., metavar=noun, help=f"the {kind}s to remove")) -> None:
        """Remove entries (refused while something refers to them)."""
        wanted = expand(names) if kind == "node" else [n.strip() for n in names.split(",")]
        with inventory() as inv:
            count = inv.remove(kind, wanted)
        shown = fold(wanted) if kind == "node" else ", ".join(wanted)
        out.print(f"removed {count} {kind}{'s' if count != 1 else ''}: {shown}")
