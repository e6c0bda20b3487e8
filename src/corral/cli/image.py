"""corral image build|import|capture|exec|shell|export|list|show|rm"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table

from corral.cli.common import err, human_size, inventory, out, print_yaml, settings

app = typer.Typer(help="OS images: built in a chroot, versioned, exported.", no_args_is_help=True)


@contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A scratch tree inside the store (same filesystem: the new version is a rename)."""
    from corral.images.build.tree import discard
    from corral.images.catalog import image_store

    store = image_store(settings().home)
    path = store.root / f".staging-{name}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if path.exists():
            discard(path)  # unmounts anything left, then removes it
            shutil.rmtree(path, ignore_errors=True)


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
    from corral.images.build import BuildSpec, build_image
    from corral.images.catalog import LayerCatalog, image_store, release_of

    release = release_of(distro)
    layers = [LayerCatalog(settings().home).get(n) for n in layer or []]
    spec = BuildSpec(
        distro=distro,
        family=release.family,
        release=release.release,
        mirror=mirror,
        packages=_split_packages(package),
        layers=layers,
        cache_dir=settings().home / "cache",
    )
    store = image_store(settings().home)
    with _staging(name) as staging:
        with err.status(f"building {name} from {distro} ({release.release})"):
            result = build_image(spec, staging)
        origin = f"build {distro}" + "".join(f" +{n}" for n in layer or [])
        version = store.add_version(name, result.root, origin=origin, move=True)
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

    store = image_store(settings().home)
    version = (
        store.import_tree(name, source) if source.is_dir() else store.import_tarball(name, source)
    )
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


def _capture_host(node: str) -> tuple[str, str | None]:
    """Where NODE is: an inventory node's first IP, else NODE itself (an address or a host
    name). Returns the address and the inventory node it came from (None: literal)."""
    from corral.images.capture.source import is_address, node_address

    if is_address(node):
        return node, None
    with inventory() as inv:
        if not inv.exists("node", node):
            return node, None
        return node_address(inv.node(node)), node


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
    from corral.images.capture.errors import SourceError
    from corral.images.capture.rsync import Progress
    from corral.images.capture.source import Source
    from corral.images.catalog import image_store
    from corral.images.store import check_name

    check_name(name)
    if ssh_key is not None and not (ssh_key.is_file() and os.access(ssh_key, os.R_OK)):
        raise SourceError(f"cannot read the SSH key {ssh_key}", "give a private key file")
    host, node_name = _capture_host(node)
    source = Source(
        host=host,
        path=source_path,
        user=user,
        port=ssh_port,
        key=ssh_key,
        known_hosts=settings().home / "ssh" / "known_hosts",
        node=node_name,
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


def _change(ref: str, origin: str, work: object) -> None:
    from corral.images.build.tree import strip_identity
    from corral.images.catalog import image_store
    from corral.images.store import copy_tree

    store = image_store(settings().home)
    base = store.get_ref(ref)
    with _staging(base.name) as staging:
        tree = staging / "rootfs"
        copy_tree(base.rootfs, tree)
        work(tree)  # type: ignore[operator]
        strip_identity(tree)
        version = store.add_version(
            base.name, tree, origin=f"{origin} on v{base.version}", move=True
        )
    out.print(f"{base.ref} -> {version.ref}", markup=False)


@app.command("exec")
def exec_(ref: str, command: list[str] = typer.Argument(..., help="-- COMMAND ARGS...")) -> None:
    """Run a command inside a copy of the image; the result is a new version."""
    from corral.images.chroot import chroot_run, mounted

    command = command[1:] if command[:1] == ["--"] else command

    def work(tree: Path) -> None:
        with mounted(tree):
            result = chroot_run(tree, command)
        out.print(result.stdout, end="", markup=False)

    _change(ref, "exec: " + " ".join(command), work)


@app.command("shell")
def shell(ref: str) -> None:
    """An interactive shell inside a copy of the image; on exit, a new version."""
    from corral.images.chroot import interactive_shell

    _change(ref, "shell", lambda tree: interactive_shell(tree))


@app.command("export")
def export(ref: str) -> None:
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
def show(ref: str) -> None:
    """An image version's manifest (packages summarised)."""
    from corral.images.catalog import image_store

    manifest = dict(image_store(settings().home).get_ref(ref).manifest)
    packages = manifest.pop("packages", [])
    manifest["packages"] = f"{len(packages)} packages"
    print_yaml(manifest)


@app.command("rm")
def rm(ref: str) -> None:
    """Remove one version (NAME:VERSION) or all versions of an image (NAME)."""
    from corral.images.catalog import image_store
    from corral.images.store import parse_ref

    name, version = parse_ref(ref)
    removed = image_store(settings().home).remove(name, version)
    out.print(f"removed {name} version(s) {', '.join(map(str, removed))}", markup=False)
