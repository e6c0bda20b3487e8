"""corral profile add|set|show|list|rm"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli.common import (
    VarsOption,
    changes,
    inventory,
    out,
    parse_vars,
    print_yaml,
    read_text,
    settings,
)
from corral.cli.entities import add_common_verbs
from corral.cli.power import power_changes, with_power_options
from corral.errors import InvalidValue, UsageError
from corral.inventory.merge import merge_node
from corral.inventory.schema import STORED, ProfileSpec, parse

app = typer.Typer(
    help="Reusable settings that nodes and groups list in order.", no_args_is_help=True
)

PARTITION_HELP = "MOUNT:FSTYPE:SIZE_MB[:grow], e.g. /:xfs:10240:grow (repeatable)"


def parse_partition(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "grow"):
        raise InvalidValue(f"bad partition '{text}': expected {PARTITION_HELP}")
    if not parts[2].isdigit():
        raise InvalidValue(f"bad partition '{text}': size '{parts[2]}' is not a number of MB")
    return {
        "mount": parts[0],
        "fstype": parts[1],
        "size_mb": int(parts[2]),
        "grow": len(parts) == 4,
    }


def parse_repo(text: str) -> dict[str, str]:
    name, sep, url = text.partition("=")
    if not sep:
        raise InvalidValue(f"bad repo '{text}': expected NAME=URL")
    return {"name": name, "baseurl": url}


def hash_password() -> str:
    from passlib.hash import sha512_crypt

    if sys.stdin.isatty():
        password = typer.prompt("root password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise InvalidValue("empty root password")
    hashed: str = sha512_crypt.hash(password)
    return hashed


Distro = Annotated[str | None, typer.Option(help="the distro this profile installs")]
KernelArgs = Annotated[
    list[str] | None, typer.Option("--kernel-arg", help="kernel argument (repeatable)")
]
KickstartTemplate = Annotated[str | None, typer.Option(help="kickstart template file name")]
Disk = Annotated[str | None, typer.Option(help="target disk, e.g. sda")]
Partitions = Annotated[list[str] | None, typer.Option("--partition", help=PARTITION_HELP)]
Packages = Annotated[
    list[str] | None, typer.Option("--package", help="package or @group (repeatable)")
]
Repos = Annotated[list[str] | None, typer.Option("--repo", help="NAME=URL (repeatable)")]
PreSnippets = Annotated[
    list[Path] | None, typer.Option("--pre", help="file with a pre-install snippet (repeatable)")
]
PostSnippets = Annotated[
    list[Path] | None, typer.Option("--post", help="file with a post-install snippet (repeatable)")
]
Timezone = Annotated[str | None, typer.Option(help="time zone, e.g. Europe/Paris")]
RootPassword = Annotated[
    bool,
    typer.Option(
        "--root-password", help="prompt for it (or read stdin); stores its SHA-512 crypt hash"
    ),
]
Image = Annotated[
    str | None, typer.Option(help="image installs: NAME or NAME:VERSION of the image")
]
Layers = Annotated[
    list[str] | None,
    typer.Option("--layer", help="layer the image must be built with (repeatable)"),
]


def _with_profile_options(apply: Callable[[str, dict[str, Any]], None]) -> Callable[..., None]:
    """The command that takes every profile option and calls ``apply`` with the profile's
    name and the fields given: ``add`` and ``set`` differ only in what they do with them."""

    @with_power_options
    def command(
        name: str,
        distro: Distro = None,
        kernel_arg: KernelArgs = None,
        kickstart_template: KickstartTemplate = None,
        disk: Disk = None,
        partition: Partitions = None,
        package: Packages = None,
        repo: Repos = None,
        pre: PreSnippets = None,
        post: PostSnippets = None,
        timezone: Timezone = None,
        var: VarsOption = None,
        root_password: RootPassword = False,
        image: Image = None,
        layer: Layers = None,
        *,
        power: dict[str, Any],
    ) -> None:
        given = power_changes(power, [name], f"profile {name}")
        fields = changes(
            distro=distro,
            image=image,
            layers=layer,
            kernel_args=kernel_arg,
            kickstart_template=kickstart_template,
            disk=disk,
            partitions=[parse_partition(p) for p in partition] if partition else None,
            packages=package,
            repos=[parse_repo(r) for r in repo] if repo else None,
            pre=[read_text(p, "snippet") for p in pre] if pre else None,
            post=[read_text(p, "snippet") for p in post] if post else None,
            timezone=timezone,
            variables=parse_vars(var) if var else None,
            root_password_hash=hash_password() if root_password else None,
            power=given[0] if given else None,
        )
        apply(name, fields)

    command.__name__, command.__doc__ = apply.__name__, apply.__doc__
    return command


@app.command("add")
@_with_profile_options
def add(name: str, data: dict[str, Any]) -> None:
    """Add a profile."""
    spec = parse(ProfileSpec, dict(data, name=name), f"profile {name}")
    with inventory() as inv:
        inv.add("profile", [spec])
    out.print(f"added profile {name}")


@app.command("set")
@_with_profile_options
def set_(name: str, data: dict[str, Any]) -> None:
    """Change a profile; a list option given replaces that list, --var merges keys.

    The nodes that use the profile are rendered with the change, as `corral sync` would
    render them: a change that breaks one (an undefined variable in a snippet) is refused.
    """
    from corral.render.check import checked_change

    with inventory() as inv, checked_change(settings(), inv, "profile", name, f"profile {name}"):
        n = inv.edit("profile", [name], data)
    out.print(f"profile {name}: {'changed' if n else 'unchanged'}")


def _scalar(value: Any) -> str:
    """A value as YAML reads it back: Python's repr, but null for None (not "None")."""
    return "null" if value is None else repr(value)


@app.command("show")
def show(
    name: str,
    node: str | None = typer.Option(None, help="show the node's merged settings and origins"),
) -> None:
    """Print a profile, or with --node the node's merged profile and where each value came from."""
    with inventory() as inv:
        spec = inv.get("profile", name)
        if node is None:
            print_yaml(spec.model_dump(mode="json", exclude_defaults=True))
            return
        node_spec = inv.node(node)
        groups = {g.name: g for g in inv.specs("group", node_spec.groups)}
        profiles = {p.name: p for p in inv.specs("profile")}
    merged = merge_node(node_spec, groups, profiles)
    if name not in merged.chain:
        raise UsageError(
            f"profile {name} is not in node {node}'s chain ({', '.join(merged.chain) or 'empty'})"
        )
    out.print(f"# node {node}: profiles {' > '.join(merged.chain)} (later wins)")
    for key, value in ProfileSpec(name="x").model_dump(mode="json").items():
        if key == "name":
            continue
        merged_value = merged.values[key]
        origin = merged.origins[key]
        if isinstance(merged_value, list):
            dumped = ProfileSpec.model_validate({"name": "x", key: merged_value}).model_dump(
                mode="json"
            )[key]
            out.print(f"{key}:" + ("" if dumped else " []"), markup=False)
            for item, src in zip(dumped, origin, strict=True):
                out.print(f"  - {_scalar(item)}  # {src}", markup=False)
        elif isinstance(merged_value, dict):
            out.print(f"{key}:" + ("" if merged_value else " {}"), markup=False)
            for k, v in merged_value.items():
                shown = STORED if (key, k) == ("power", "password") else v
                out.print(f"  {k}: {_scalar(shown)}  # {origin[k]}", markup=False)
        else:
            shown = merged_value if merged_value is not None else value
            out.print(f"{key}: {_scalar(shown)}  # {origin or 'default'}", markup=False)


add_common_verbs(
    app,
    "profile",
    {
        "distro": lambda p: p.distro or "",
        "packages": lambda p: str(len(p.packages)),
        "variables": lambda p: ",".join(p.variables),
    },
    show=False,
)
