"""corral apply | export: the whole cluster as one declarative file."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from corral.cli.common import inventory, out, read_text
from corral.inventory.clusterfile import apply_cluster, export_cluster, load_cluster


def apply(
    file: Path = typer.Option(..., "-f", "--file", help="cluster file (YAML), or - for stdin"),
) -> None:
    """Create or update everything the file describes; prints created/changed/unchanged."""
    text = sys.stdin.read() if str(file) == "-" else read_text(file, "cluster file")
    cluster = load_cluster(text, str(file))
    with inventory() as inv:
        summary = apply_cluster(inv, cluster)
    for kind, counts in summary.items():
        out.print(
            f"{kind + 's':9} {counts['created']:6} created {counts['changed']:6} changed "
            f"{counts['unchanged']:6} unchanged",
            markup=False,
        )


def export(
    output: Path | None = typer.Option(
        None, "-o", "--output", help="file to write (default stdout)"
    ),
) -> None:
    """Print the inventory as a cluster file that `corral apply` takes back unchanged."""
    with inventory() as inv:
        text = export_cluster(inv)
    if output is None:
        out.print(text, end="", markup=False)
    else:
        from corral.render.sync import write_atomic

        write_atomic(output, text.encode())
