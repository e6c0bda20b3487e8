"""What every command needs: settings, a transaction on the inventory (both
:mod:`corral.inventory.db`'s), output helpers, and the options that several nouns share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.text import Text

from corral.errors import InvalidValue
from corral.inventory.clusterfile import AliasBomb, load_yaml
from corral.inventory.db import engine as engine
from corral.inventory.db import inventory as inventory
from corral.inventory.db import session as session
from corral.inventory.db import settings as settings
from corral.units import human_size as human_size

# No Rich markup in anything printed: what corral prints is data (names, messages from
# nodes, paths), where "[/]" or "[bold]" must show as written. Table cells too.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

#: ``--var KEY=VALUE``, read with :func:`parse_vars`.
VarsOption = Annotated[list[str] | None, typer.Option("--var", help="KEY=VALUE (repeatable)")]
#: ``--profile NAME``: the profile chain of a node or group.
ProfilesOption = Annotated[
    list[str] | None,
    typer.Option("--profile", help="profile, in order; ~NAME drops one (repeatable)"),
]


def parse_vars(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are read as YAML scalars (``true``, ``3``, ``text``)."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidValue(f"bad variable '{item}': expected key=value")
        if not value.isprintable():
            # YAML would fold a line break into a space: keep the text as given, for the
            # schema to refuse what a boot file must not hold.
            result[key] = value
            continue
        try:
            result[key] = load_yaml(value) if value else ""
        except AliasBomb as exc:
            raise InvalidValue(f"bad variable '{key}': {exc}") from None
        except yaml.YAMLError:
            result[key] = value
    return result


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidValue(f"cannot read {what} {path}: {exc.strerror}") from None


def print_yaml(data: Any) -> None:
    out.print(yaml.safe_dump(data, sort_keys=False, width=100).rstrip("\n"), markup=False)


def cell(value: object) -> Text:
    """A table cell holding data as it is: a node's message with "[/]" in it is text,
    not Rich markup (which would fail to parse, or style what follows)."""
    return Text("" if value is None else str(value))


def local_time(timestamp: float | None) -> str:
    """A Unix time as people read it, in local time: ``2026-12-03 04:12:05``."""
    if timestamp is None:
        return ""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def changes(**options: Any) -> dict[str, Any]:
    """The options a user actually gave (None means 'not given')."""
    return {k: v for k, v in options.items() if v is not None}
