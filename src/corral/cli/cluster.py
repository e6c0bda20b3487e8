"""corral apply | export: the whole cluster as one declarative file."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from corral.cli.common import inventory, out, read_text
from corral.inventory.clusterfile import (
    ApplyOutcome,
    apply_cluster_entries,
    export_cluster,
    load_cluster,
)
from corral.inventory.noderange import fold


class _DryRun(Exception):
    """Raised inside the transaction of a dry run, so that it rolls back."""


def apply(
    file: Path = typer.Option(..., "-f", "--file", help="cluster file (YAML), or - for stdin"),
    prune: bool = typer.Option(
        False, "--prune", help="also remove the distros, profiles, groups and nodes it omits"
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print what would change, and change nothing"
    ),
) -> None:
    """Create or update everything the file describes, and name what was created, changed
    or (with --prune) removed; then counts per kind. All or nothing: one transaction."""
    text = sys.stdin.read() if str(file) == "-" else read_text(file, "cluster file")
    cluster = load_cluster(text, str(file))
    try:
        with inventory() as inv:
            entries = apply_cluster_entries(inv, cluster, prune=prune)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    verbs: dict[ApplyOutcome, str] = {"created": "create", "changed": "change", "removed": "remove"}
    for kind, outcomes in entries.items():
        for outcome, verb in verbs.items():
            names = outcomes[outcome]
            if names:
                shown = fold(names) if kind == "node" else ", ".join(names)
                what = f"would {verb}" if dry_run else outcome
                out.print(f"{what} {kind}{'s' if len(names) > 1 else ''}: {shown}", markup=False)
    for kind, outcomes in entries.items():
        counts = {outcome: len(names) for outcome, names in outcomes.items()}
        removed = f" {counts['removed']:6} removed" if prune else ""
        out.print(
            f"{kind + 's':9} {counts['created']:6} created {counts['changed']:6} changed "
            f"{counts['unchanged']:6} unchanged{removed}",
            markup=False,
        )
    if dry_run:
        out.print("dry run: nothing was changed", markup=False)


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
        from corral.files import write_atomic

        write_atomic(output, text)
