"""corral distro add|set|show|list|rm"""

from __future__ import annotations

import typer

from corral.cli.common import changes, inventory, out, settings
from corral.cli.entities import add_common_verbs
from corral.inventory.bootfiles import imported
from corral.inventory.schema import DistroSpec, Family, parse

app = typer.Typer(
    help="Operating system distributions that profiles install.", no_args_is_help=True
)


@app.command("add")
def add(
    name: str,
    family: Family = typer.Option(..., help="rhel, fedora, debian or ubuntu"),
    os_version: str = typer.Option(..., help="version for validation, e.g. RHEL9"),
    kernel: str = typer.Option(..., help="kernel path or URL"),
    initrd: str = typer.Option(..., help="initrd path or URL"),
    install_tree: str | None = typer.Option(None, help="install tree URL"),
    arch: str = typer.Option("x86_64"),
) -> None:
    """Add a distro."""
    spec = parse(
        DistroSpec,
        changes(
            name=name,
            family=family,
            os_version=os_version,
            kernel=kernel,
            initrd=initrd,
            install_tree=install_tree,
            arch=arch,
        ),
        f"distro {name}",
    )
    with inventory() as inv, imported(settings().home, name, spec.model_dump()) as files:
        inv.add("distro", [spec.model_copy(update=files)])
    out.print(f"added distro {name}")


@app.command("set")
def set_(
    name: str,
    family: Family | None = typer.Option(None),
    os_version: str | None = typer.Option(None),
    kernel: str | None = typer.Option(None),
    initrd: str | None = typer.Option(None),
    install_tree: str | None = typer.Option(None),
    arch: str | None = typer.Option(None),
) -> None:
    """Change a distro's fields."""
    fields = changes(
        family=family,
        os_version=os_version,
        kernel=kernel,
        initrd=initrd,
        install_tree=install_tree,
        arch=arch,
    )
    with inventory() as inv:
        inv.distro(name)  # an unknown one is refused before any file is looked at
        with imported(settings().home, name, fields) as files:
            n = inv.update("distro", [name], fields | files)
    out.print(f"distro {name}: {'changed' if n else 'unchanged'}")


add_common_verbs(
    app,
    "distro",
    {
        "family": lambda d: d.family.value,
        "version": lambda d: d.os_version,
        "arch": lambda d: d.arch,
        "install tree": lambda d: d.install_tree or "",
    },
)
