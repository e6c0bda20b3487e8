"""corral layer add|show|list|rm: package sets and file overlays to put on images."""

from __future__ import annotations

from pathlib import Path

import typer

from corral.cli.common import out, print_yaml, settings

app = typer.Typer(
    help="Layers: packages and overlay files on top of a base image.", no_args_is_help=True
)


@app.command("add")
def add(
    name: str,
    package: list[str] | None = typer.Option(None, "--package", help="package (repeatable)"),
    overlay: Path | None = typer.Option(None, help="directory copied over the image's root"),
) -> None:
    """Define a layer; `corral image build --layer NAME` applies it."""
    from corral.images.catalog import LayerCatalog

    LayerCatalog(settings().home).add(name, list(package or []), overlay)
    out.print(f"added layer {name}", markup=False)


@app.command("show")
def show(name: str) -> None:
    """Print a layer's packages and overlay directory."""
    from corral.images.catalog import LayerCatalog

    layer = LayerCatalog(settings().home).get(name)
    print_yaml(
        {
            "name": layer.name,
            "packages": layer.packages,
            "overlay": str(layer.overlay) if layer.overlay else None,
        }
    )


@app.command("list")
def list_() -> None:
    """List the layers' names."""
    from corral.images.catalog import LayerCatalog

    for name in LayerCatalog(settings().home).names():
        out.print(name, markup=False)


@app.command("rm")
def rm(name: str) -> None:
    """Remove a layer (images built with it keep what it gave them)."""
    from corral.images.catalog import LayerCatalog

    LayerCatalog(settings().home).remove(name)
    out.print(f"removed layer {name}", markup=False)
