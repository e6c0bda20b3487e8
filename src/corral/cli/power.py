"""The power options of ``corral node|group|profile add|set`` (--power-driver, --bmc-*),
and reading a BMC password from a prompt, a file or stdin, never from the command line."""

from __future__ import annotations

import functools
import inspect
import ipaddress
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.errors import InvalidValue
from corral.inventory.nodes import offset_ip
from corral.inventory.schema import PowerDriver

_PANEL = "Power (BMC)"

#: The options, as typer reads them from a signature: (name, annotation).
_OPTIONS: list[tuple[str, Any]] = [
    (
        "power_driver",
        Annotated[
            PowerDriver | None,
            typer.Option(help="how corral powers the nodes", rich_help_panel=_PANEL),
        ],
    ),
    (
        "bmc_address",
        Annotated[
            str | None,
            typer.Option(
                help="the BMC: host[:port], or a Redfish URL; an IPv4 address is the first "
                "node's and the others count up; {node} is each node's name",
                rich_help_panel=_PANEL,
            ),
        ],
    ),
    (
        "bmc_user",
        Annotated[str | None, typer.Option(help="BMC user", rich_help_panel=_PANEL)],
    ),
    (
        "ask_bmc_password",
        Annotated[
            bool,
            typer.Option(
                "--ask-bmc-password", help="prompt for the BMC password", rich_help_panel=_PANEL
            ),
        ],
    ),
    (
        "bmc_password_file",
        Annotated[
            Path | None,
            typer.Option(
                help="read the BMC password from this file's first line (- for stdin)",
                rich_help_panel=_PANEL,
            ),
        ],
    ),
    # Refused with the way to give it: a password in argv shows in process lists and history.
    ("bmc_password", Annotated[str | None, typer.Option(hidden=True)]),
    (
        "redfish_system",
        Annotated[
            str | None,
            typer.Option(
                help="Redfish system id (default: the BMC's only one)", rich_help_panel=_PANEL
            ),
        ],
    ),
    (
        "ipmi_cipher_suite",
        Annotated[
            int | None,
            typer.Option(help="IPMI lanplus cipher suite (0-17)", rich_help_panel=_PANEL),
        ],
    ),
    (
        "power_command",
        Annotated[
            str | None,
            typer.Option(
                help="command driver: a command line with {node} and {action}",
                rich_help_panel=_PANEL,
            ),
        ],
    ),
]
_NAMES = [name for name, _ in _OPTIONS]


def read_password(ask: bool, file: Path | None, given: str | None, what: str) -> str | None:
    """The BMC password from a prompt or a file (- for stdin); None if none is given."""
    if given is not None:
        raise InvalidValue(
            "a password on the command line shows in process lists and shell history",
            "give --ask-bmc-password to be prompted, or --bmc-password-file FILE (- for stdin)",
        )
    if ask and file:
        raise InvalidValue("give --ask-bmc-password or --bmc-password-file, not both")
    if ask:
        text: str = typer.prompt(
            f"BMC password of {what}", hide_input=True, confirmation_prompt=True
        )
    elif file is not None:
        try:
            text = sys.stdin.readline() if str(file) == "-" else file.read_text()
        except OSError as exc:
            raise InvalidValue(
                f"cannot read the BMC password file {file}: {exc.strerror}"
            ) from None
        text = text.splitlines()[0] if text.strip() else ""
    else:
        return None
    if not text:
        raise InvalidValue(f"the BMC password of {what} is empty", "give the password")
    return text


def _addresses(first: str | None, names: list[str]) -> list[str | None]:
    """One BMC address per node: an IPv4 counts up from the first node's, {node} is
    replaced by each node's name, anything else is the same for all."""
    if first is None:
        return [None] * len(names)
    try:
        ipaddress.IPv4Address(first)
    except ValueError:
        return [first.replace("{node}", name) for name in names]
    if len(names) > 1:
        return [offset_ip(first, i) for i in range(len(names))]
    return [first]


def power_changes(options: dict[str, Any], names: list[str], what: str) -> list[dict[str, Any]]:
    """The power fields given, one dict per node of ``names`` (empty: none given)."""
    password = read_password(
        options["ask_bmc_password"], options["bmc_password_file"], options["bmc_password"], what
    )
    common = {
        key: value
        for key, value in (
            ("driver", options["power_driver"]),
            ("user", options["bmc_user"]),
            ("password", password),
            ("system", options["redfish_system"]),
            ("cipher_suite", options["ipmi_cipher_suite"]),
            ("command", options["power_command"]),
        )
        if value is not None
    }
    addresses = _addresses(options["bmc_address"], names)
    per_node = [{**common, **({"address": address} if address else {})} for address in addresses]
    return per_node if any(per_node) else []


def with_power_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the power options added to its signature (for typer); it gets
    them as one keyword argument, ``power``: a dict of the options as given."""
    signature = inspect.signature(command, eval_str=True)
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=False if name == "ask_bmc_password" else None,
            annotation=annotation,
        )
        for name, annotation in _OPTIONS
    ]
    kept = [p for p in signature.parameters.values() if p.name != "power"]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in _NAMES}
        command(*args, power=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{k: v for k, v in command.__annotations__.items() if k != "power"},
        **dict(_OPTIONS),
    }
    return wrapper
