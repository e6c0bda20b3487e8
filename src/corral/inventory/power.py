"""A node's power settings in the inventory: merged from its profiles, groups and own
entry, checked complete for their driver, and their BMC password sealed before it is
stored (:mod:`corral.vault`).

What a ``password`` field holds depends on where it is:

- in a cluster file, the REST API or ``set``: the password, or ``(stored)``
  (:data:`~corral.inventory.schema.STORED`) for "keep the one stored";
- in the database: the password sealed (``fernet:...``);
- everywhere it is shown (``export``, ``show``, the API's answers): ``(stored)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from corral.errors import InvalidValue
from corral.inventory.merge import merge_node
from corral.inventory.schema import STORED, GroupSpec, NodeSpec, PowerSpec, ProfileSpec
from corral.power.check import REQUIRED, check
from corral.vault import Vault, is_sealed

_OPTION = {
    "address": "--bmc-address ADDRESS",
    "user": "--bmc-user USER",
    "password": "--ask-bmc-password",
    "command": "--power-command 'COMMAND {node} {action}'",
}


def node_power(
    node: NodeSpec, groups: Mapping[str, GroupSpec], profiles: Mapping[str, ProfileSpec]
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The node's merged power settings (the password sealed; None: none set anywhere),
    and where each came from ("group compute")."""
    merged = merge_node(node, groups, profiles)
    return merged.values.get("power"), merged.origins.get("power") or {}


def incomplete(node: str, power: Mapping[str, Any] | None, origins: Mapping[str, str]) -> str:
    """What is wrong with the merged ``power`` of ``node`` for its driver (a field it
    lacks, an address or command it cannot use), as one line with the fix; "" if nothing
    (or no driver is set: the node is powered by hand)."""
    if not power or not power.get("driver"):
        return ""
    driver = str(power["driver"])
    where = origins.get("driver", f"node {node}")
    missing = [f for f in REQUIRED.get(driver, ()) if not power.get(f)]
    if missing:
        fix = " ".join(_OPTION[f] for f in missing)
        lacks = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        return (
            f"node {node}: power driver {driver} (set on {where}) needs {lacks}: give "
            f"{'it' if len(missing) == 1 else 'them'} with corral node add|set {fix}, or in "
            "the cluster file"
        )
    problems = check(power)
    return f"node {node}: {problems[0]}" if problems else ""


def refuse_incomplete(
    nodes: Iterable[NodeSpec],
    groups: Mapping[str, GroupSpec],
    profiles: Mapping[str, ProfileSpec],
    *,
    was_complete: Callable[[str], bool] = lambda _name: True,
) -> None:
    """Raise InvalidValue (exit 2) for the first node whose power settings miss a field
    its driver needs, unless ``was_complete(name)`` says it lacked it before the change
    (a change is not blamed for what it did not break)."""
    for node in nodes:
        power, origins = node_power(node, groups, profiles)
        problem = incomplete(node.name, power, origins)
        if problem and was_complete(node.name):
            raise InvalidValue(problem)


def seal_password(
    what: str, power: PowerSpec | None, stored: PowerSpec | None, vault: Callable[[], Vault]
) -> PowerSpec | None:
    """``power`` as the database keeps it: its password sealed, ``(stored)`` or none
    replaced by the password already stored for the entry, and a password equal to the
    stored one kept as it is sealed (re-applying a file changes nothing)."""
    if power is None:
        return None
    old = stored.password if stored is not None else None
    new = power.password
    if new is None or new == STORED:
        if new == STORED and old is None:
            raise InvalidValue(
                f"{what}: power.password is {STORED} but no BMC password is stored for it",
                "give the password (corral ... set --ask-bmc-password, or password: in the "
                "cluster file)",
            )
        sealed = old
    elif is_sealed(new):
        sealed = new  # as the database holds it (a spec read back and written again)
    elif old is not None and vault().open(old, f"the BMC password of {what}") == new:
        sealed = old
    else:
        sealed = vault().seal(new)
    return power if sealed == power.password else power.model_copy(update={"password": sealed})
