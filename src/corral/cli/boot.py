"""corral render | sync: the boot files of nodes."""

from __future__ import annotations

from pathlib import Path

import typer

from corral.cli.common import err, out, session, settings
from corral.errors import InvalidBootFile, InvalidValue
from corral.inventory.store import Inventory

# The renderers (Jinja2, pykickstart) load only when a command needs them.
FILE_KINDS = ("ipxe", "pxelinux", "grub", "kickstart", "pre", "post")
KindOpt = typer.Option(..., "--kind", help="|".join(FILE_KINDS))


def render(
    node: str = typer.Argument(..., metavar="NODE", help="the node's name"),
    kind: str = KindOpt,
) -> None:
    """Print one of a node's files, validated as sync would validate it.

    Files name the URL nodes fetch from as corral serve does: server_url, else
    http://ADDRESS:HTTP_PORT from the settings address and http_port (when address is
    one address), else http://10.0.0.1:8080.
    """
    from corral.render.renderer import FileKind, Renderer, Snapshot
    from corral.render.validate import check_grub, check_kickstarts

    if kind not in FILE_KINDS:
        raise InvalidValue(f"unknown kind '{kind}'", f"use one of: {', '.join(FILE_KINDS)}")
    file_kind: FileKind = kind  # type: ignore[assignment]
    with session() as s:
        spec = Inventory(s).node(node)
        renderer = Renderer(settings(), Snapshot(s))
        text = renderer.render_one(spec, file_kind)
        distro = renderer.distro_of(spec, renderer.merged(spec))
    label = f"{kind} of {node}"
    problems = []
    if file_kind == "kickstart" and distro is not None:
        problems = check_kickstarts([(distro.os_version, label, text)])
    elif file_kind == "grub":
        problems = check_grub([(label, text)])
    if problems:
        p = problems[0]
        raise InvalidBootFile(node, label, p.line, p.message)
    out.print(text, end="", markup=False)


def sync(
    root: Path = typer.Option(..., "--root", help="directory to maintain (the TFTP/HTTP root)"),
    full: bool = typer.Option(False, "--full", help="re-render every node and compare with disk"),
) -> None:
    """Write every node's boot files: only what changed, atomically, removing stale ones.

    Files name the URL nodes fetch from as corral serve does: server_url, else
    http://ADDRESS:HTTP_PORT from the settings address and http_port (when address is
    one address), else http://10.0.0.1:8080.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from corral.render.sync import Syncer

    progress = Progress(
        TextColumn("rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with progress, session() as s:
        task = progress.add_task("render", total=None)
        report = Syncer(settings(), s, root).run(
            full=full,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for failure in report.failures[:10]:
        err.print(f"error: {failure}", markup=False)
    if len(report.failures) > 10:
        err.print(f"error: ... and {len(report.failures) - 10} more", markup=False)
    mode = "full" if report.full else "incremental"
    out.print(
        f"sync {root} ({mode}, {report.nodes} nodes): {report.written} written, "
        f"{report.unchanged} unchanged, {report.removed} removed",
        markup=False,
    )
    if report.failures:
        err.print(
            f"error: {len(report.failures)} node(s) failed; their files were not written",
            markup=False,
        )
        raise typer.Exit(2)
