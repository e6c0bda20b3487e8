"""Refusing an inventory change that would break nodes' boot files, before it is stored.

A profile's snippets and variables are rendered only when a node's files are: without a
check at change time, ``profile set --post snippet.sh`` with an undefined variable is
accepted, and fails at the next ``sync`` or boot. The ``set`` commands and the REST
API's PATCH make their change inside :func:`checked_change`: it takes the affected
nodes' state with :func:`before_change`, and once the change is made calls
:func:`refuse_breaking_change`, which renders those nodes as ``sync`` would and raises
for one that the change broke, so that the transaction rolls back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session

from corral.config import Settings
from corral.errors import RenderError
from corral.inventory.merge import profile_chain
from corral.inventory.power import incomplete, node_power, refuse_incomplete
from corral.inventory.schema import NodeSpec
from corral.inventory.store import Inventory
from corral.render.renderer import Renderer, Snapshot


@dataclass(frozen=True)
class Before:
    """The inventory before a change, and the nodes it may affect as they were."""

    snapshot: Snapshot  # its profiles, groups and distros, loaded before the change
    nodes: dict[str, NodeSpec]


def profile_users(snapshot: Snapshot, profile: str) -> list[str]:
    return [n.name for n in snapshot.nodes() if profile in profile_chain(n, snapshot.groups)]


def group_members(snapshot: Snapshot, group: str) -> list[str]:
    return [n.name for n in snapshot.nodes() if group in n.groups]


def before_change(session: Session, affected: str | list[str], kind: str = "node") -> Before:
    """What :func:`refuse_breaking_change` compares with: call it before the change.
    ``affected``: node names, or the profile's or group's name (``kind``)."""
    snapshot = Snapshot(session)
    if kind == "profile":
        names = profile_users(snapshot, str(affected))
    elif kind == "group":
        names = group_members(snapshot, str(affected))
    else:
        names = list(affected)
    return Before(snapshot, {n.name: n for n in snapshot.nodes(names)})


def refuse_breaking_change(settings: Settings, session: Session, before: Before, what: str) -> int:
    """Render the affected nodes as they are now (the change flushed to ``session``), as
    ``sync`` renders them (without the pykickstart/GRUB validation), and raise the first
    :class:`RenderError` of a node that rendered before the change. A node that failed
    already is not held against it: sync goes on reporting it. Likewise a node whose power
    settings the change left incomplete for their driver (InvalidValue). Returns how many
    nodes were rendered."""
    session.flush()
    now = Snapshot(session)

    def power_was_complete(name: str) -> bool:
        power, origins = node_power(
            before.nodes[name], before.snapshot.groups, before.snapshot.profiles
        )
        return not incomplete(name, power, origins)

    refuse_incomplete(
        now.nodes(before.nodes), now.groups, now.profiles, was_complete=power_was_complete
    )
    renderer, previous = Renderer(settings, now), Renderer(settings, before.snapshot)
    for node in now.nodes(before.nodes):
        try:
            renderer.render_node(node)
        except RenderError as exc:
            try:
                previous.render_node(before.nodes[node.name])
            except RenderError:
                continue
            raise RenderError(
                f"{what}: the change breaks {exc.message}",
                "nothing was changed; fix the snippet or template, or define the value in "
                "a profile, group or node first",
            ) from None
    return len(before.nodes)


@contextmanager
def checked_change(
    settings: Settings, inv: Inventory, kind: str, affected: str | list[str], what: str
) -> Iterator[None]:
    """Refuse the change made to ``inv`` in the block if it breaks a node it affects
    (``affected`` and ``kind`` as for :func:`before_change`; ``what`` names the change in
    the error): see :func:`refuse_breaking_change`. A block that changed nothing renders
    nothing."""
    before = before_change(inv.session, affected, kind)
    generation = inv.generation
    yield
    if inv.generation != generation:
        refuse_breaking_change(settings, inv.session, before, what)
