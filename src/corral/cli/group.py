"""corral group add|set|show|list|rm"""

from __future__ import annotations

import typer

from corral.cli.common import (
    ProfilesOption,
    VarsOption,
    changes,
    inventory,
    out,
    parse_vars,
    settings,
)
from corral.cli.entities import add_common_verbs
from corral.inventory.schema import GroupSpec, parse

app = typer.Typer(help="Named sets of nodes sharing profiles and variables.", no_args_is_help=True)


@app.command("add")
def add(name: str, profile: ProfilesOption = None, var: VarsOption = None) -> None:
    """Add a group; nodes join it with `corral node set NODES --group NAME`."""
    spec = parse(
        GroupSpec,
        changes(name=name, profiles=profile, variables=parse_vars(var) if var else None),
        f"group {name}",
    )
    with inventory() as inv:
        inv.add("group", [spec])
    out.print(f"added group {name}")


@app.command("set")
def set_(name: str, profile: ProfilesOption = None, var: VarsOption = None) -> None:
    """Change a group; --profile replaces the list, --var merges keys.

    Its nodes are rendered with the change, as `corral sync` would render them: a change
    that breaks one is refused.
    """
    from corral.render.check import checked_change

    data = changes(profiles=profile, variables=parse_vars(var) if var else None)
    with inventory() as inv, checked_change(settings(), inv, "group", name, f"group {name}"):
        n = inv.edit("group", [name], data)
    out.print(f"group {name}: {'changed' if n else 'unchanged'}")


add_common_verbs(
    app,
    "group",
    {
        "profiles": lambda g: ",".join(g.profiles),
        "variables": lambda g: ",".join(g.variables),
    },
)
