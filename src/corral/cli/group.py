"""corral group add|set|show|list|rm"""

from __future__ import annotations

from typing import Any

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
from corral.cli.power import power_changes, with_power_options
from corral.inventory.schema import GroupSpec, parse

app = typer.Typer(help="Named sets of nodes sharing profiles and variables.", no_args_is_help=True)


def _fields(
    name: str, profile: list[str] | None, var: list[str] | None, power: dict[str, Any]
) -> dict[str, Any]:
    given = power_changes(power, [name], f"group {name}")
    return changes(
        profiles=profile,
        variables=parse_vars(var) if var else None,
        power=given[0] if given else None,
    )


@app.command("add")
@with_power_options
def add(
    name: str, profile: ProfilesOption = None, var: VarsOption = None, *, power: dict[str, Any]
) -> None:
    """Add a group; nodes join it with `corral node set NODES --group NAME`."""
    spec = parse(GroupSpec, {"name": name, **_fields(name, profile, var, power)}, f"group {name}")
    with inventory() as inv:
        inv.add("group", [spec])
    out.print(f"added group {name}")


@app.command("set")
@with_power_options
def set_(
    name: str, profile: ProfilesOption = None, var: VarsOption = None, *, power: dict[str, Any]
) -> None:
    """Change a group; --profile replaces the list, --var merges keys.

    Its nodes are rendered with the change, as `corral sync` would render them: a change
    that breaks one is refused.
    """
    from corral.render.check import checked_change

    data = _fields(name, profile, var, power)
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
