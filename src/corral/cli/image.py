"""corral image build|import|capture|exec|shell|export|list|show|rm"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from corral.cli.common import err, human_size, inventory, out, print_yaml, settings

if TYPE_CHECKING:
    from corral.images.workflows import Change

#: What an image argument takes.
REF_HELP = "an image, e.g. 'compute' (its newest version) or 'compute:3'"

app = typer.Typer(help="OS images: built in a chroot, versioned, exported.", no_args_is_help=True)


def _export(ref: str) -> None:
    from corral.images.catalog import image_store
    from corral.images.exports import build_exports

    version = image_store(settings().home).get_ref(ref)
    start = time.monotonic()
    with err.status(f"exporting {version.ref} (tree, zstd chunks, squashfs)"):
        exports = build_exports(version)
    for which, info in exports.items():
        size = info.get("size_bytes") or info.get("size") or 0 if isinstance(info, dict) else 0
        out.print(f"  export {which:9} {size / 1e6:9.1f} MB", markup=False)
    out.print(f"exported {version.ref} in {time.monotonic() - start:.1f} s", markup=False)


def _split_packages(given: list[str] | None) -> list[str]:
    """``--packages a,b --packages c`` -> ``[a, b, c]``."""
    return [name.strip() for item in given or [] for name in item.split(",") if name.strip()]


@app.command("build")
def build(
    name: str,
    distro: str = typer.Option(..., help="e.g. debian-12, ubuntu-24.04, rocky-9"),
    package: list[str] | None = typer.Option(
        None,
        "--packages",
        "--package",
        help="extra packages, comma-separated or repeated (installed by apt/dnf after the base)",
    ),
    layer: list[str] | None = typer.Option(None, "--layer", help="layer to apply, in order"),
    mirror: str | None = typer.Option(None, help="package mirror (Debian: the host's apt)"),
    exports: bool = typer.Option(True, "--exports/--no-exports", help="build the exports too"),
) -> None:
    """Build an image from scratch in a chroot; the result is its next version."""
    from corral.images.catalog import release_of
    from corral.images.workflows import build_version

    release = release_of(distro).release
    with err.status(f"building {name} from {distro} ({release})"):
        built = build_version(
            settings().home,
            name,
            distro,
            packages=_split_packages(package),
            layers=layer or [],
            mirror=mirror,
        )
    version, result = built.version, built.result
    out.print(
        f"built {version.ref}: {result.size_bytes / 1e6:.0f} MB, "
        f"{len(result.packages)} packages, {result.seconds:.0f} s",
        markup=False,
    )
    if exports:
        _export(version.ref)


@app.command("import")
def import_(name: str, source: Path) -> None:
    """Import a root tree from a directory or a tarball (.tar, .tar.gz, .tar.zst, .tar.xz)."""
    from corral.images.catalog import image_store
    from corral.images.workflows import import_version

    version = import_version(image_store(settings().home), name, source)
    out.print(f"imported {version.ref} from {source}", markup=False)


def _size(n: float) -> str:
    """Bytes for people: 812 B, 3.4 kB, 12.0 MB, 1,234.5 GB."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:,.1f} GB"


@app.command("capture")
def capture(
    node: str = typer.Argument(..., help="inventory node, host name or IP address"),
    name: str = typer.Option(..., "--name", help="image the capture becomes a version of"),
    exclude: list[str] | None = typer.Option(
        None,
        "--exclude",
        help="rsync pattern to leave out on top of the defaults (repeatable); "
        "a leading / anchors it at the root of the tree, DIR/* keeps DIR itself",
    ),
    ssh_key: Path | None = typer.Option(None, "--ssh-key", help="private key to log in with"),
    ssh_port: int = typer.Option(22, "--ssh-port", help="the node's SSH port"),
    user: str = typer.Option("root", "--user", help="login on the node (it must read all)"),
    source_path: str = typer.Option(
        "/", "--source-path", help="directory on the node to capture (e.g. a mounted disk)"
    ),
    exports: bool = typer.Option(True, "--exports/--no-exports", help="build the exports too"),
) -> None:
    """Capture a running node's root tree over rsync+SSH as the next version of an image."""
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn
    from rich.progress import Progress as ProgressBar

    from corral.images.capture import capture as capture_tree
    from corral.images.capture.rsync import Progress
    from corral.images.catalog import image_store
    from corral.images.workflows import capture_source

    source = capture_source(
        settings().home,
        name,
        node,
        inventory,
        path=source_path,
        user=user,
        port=ssh_port,
        key=ssh_key,
    )
    store = image_store(settings().home)
    bar = ProgressBar(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    if err.is_terminal:  # with the bar; a log or a script gets the summary line only
        err.print(f"capturing {source.where}:{source.path} into {name}", markup=False)
    with bar:
        task = bar.add_task("connecting", total=100, detail="")

        def show(progress: Progress) -> None:
            detail = f"{_size(progress.bytes)}  {progress.rate}"
            if progress.files_left is not None:
                detail += f"  {progress.files_left} files to check"
            bar.update(task, completed=progress.percent, detail=detail)

        result = capture_tree(
            store,
            name,
            source,
            list(exclude or []),
            on_step=lambda text: bar.update(task, description=text),
            on_progress=show,
        )
    m = result.version.manifest
    received = result.received_bytes
    sent = f", {_size(received)} received" if received is not None else ""
    seeded = f" (on top of {result.seeded_from})" if result.seeded_from else ""
    out.print(
        f"captured {result.version.ref} from {source.where}:{source.path}{seeded}: "
        f"{_size(m['size_bytes'])} in {m['file_count']:,} files{sent}, {result.seconds:.0f} s",
        markup=False,
    )
    if len(result.filesystems) > 1:
        out.print(f"  filesystems: {' '.join(result.filesystems)}", markup=False)
    if exports:
        _export(result.version.ref)


def _changed(change: Change) -> None:
    out.print(f"{change.base.ref} -> {change.version.ref}", markup=False)


@app.command("exec")
def exec_(
    ref: str = typer.Argument(..., metavar="IMAGE[:VERSION]", help=REF_HELP),
    command: list[str] = typer.Argument(..., help="-- COMMAND ARGS..."),
) -> None:
    """Run a command inside a copy of the image; the result is a new version."""
    from corral.images.catalog import image_store
    from corral.images.workflows import run_in_image

    command = command[1:] if command[:1] == ["--"] else command
    store = image_store(settings().home)
    _changed(run_in_image(store, ref, command, lambda text: out.print(text, end="", markup=False)))


@app.command("shell")
def shell(ref: str = typer.Argument(..., metavar="IMAGE[:VERSION]", help=REF_HELP)) -> None:
    """An interactive shell inside a copy of the image; on exit, a new version."""
    from corral.images.catalog import image_store
    from corral.images.workflows import shell_in_image

    _changed(shell_in_image(image_store(settings().home), ref))


@app.command("export")
def export(ref: str = typer.Argument(..., metavar="IMAGE[:VERSION]", help=REF_HELP)) -> None:
    """Build (or check and reuse) the image's exports: tree, zstd chunks, squashfs."""
    _export(ref)


@app.command("list")
def list_() -> None:
    """Every version of every image."""
    from corral.images.catalog import image_store

    table = Table("image", "size", "files", "packages", "origin", box=None, pad_edge=False)
    for version in image_store(settings().home).list():
        m = version.manifest
        table.add_row(
            version.ref,
            human_size(m["size_bytes"]),
            str(m["file_count"]),
            str(len(m.get("packages", []))),
            str(m.get("origin", "")),
        )
    out.print(table)


@app.command("show")
def show(ref: str = typer.Argument(..., metavar="IMAGE[:VERSION]", help=REF_HELP)) -> None:
    """An image version's manifest (packages summarised)."""
    from corral.images.catalog import image_store

    manifest = dict(image_store(settings().home).get_ref(ref).manifest)
    packages = manifest.pop("packages", [])
    manifest["packages"] = f"{len(packages)} packages"
    print_yaml(manifest)


@app.command("rm")
def rm(ref: str = typer.Argument(..., metavar="IMAGE[:VERSION]", help=REF_HELP)) -> None:
    """Remove one version (NAME:VERSION) or all versions of an image (NAME)."""
    from corral.images.catalog import image_store
    from corral.images.store import parse_ref

    name, version = parse_ref(ref)
    removed = image_store(settings().home).remove(name, version)
    out.print(f"removed {name} version(s) {', '.join(map(str, removed))}", markup=False)
