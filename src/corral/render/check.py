"""Refusing an inventory change that would break nodes' boot files, before it is stored.

A profile's snippets and variables are rendered only when a node's files are: without a
check at change time, ``profile set --post snippet.sh`` with an undefined variable is
accepted, and fails at the next ``sync`` or boot. These functions render the affected
nodes inside the change's transaction, as ``sync`` would render them, so that the caller
can roll the change back.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from corral.config import Settings
from corral.errors import RenderError
from corral.inventory.merge import profile_chain
from corral.render.renderer import Renderer, Snapshot


def _users_of(snapshot: Snapshot, profile: str) -> list[str]:
    return [
        node.name for node in snapshot.nodes() if profile in profile_chain(node, snapshot.groups)
    ]


def check_profile_users(
    settings: Settings, session: Session, before: Snapshot, profile: str
) -> int:
    """Render every node whose chain holds ``profile``, with the changed profile (flushed
    to ``session``); raise the first :class:`RenderError` of a node that the change
    breaks. A node that failed already before the change (``before``) is not held
    against it. Returns how many nodes were rendered."""
    after = Snapshot(session)
    renderer = Renderer(settings, after)
    names = _users_of(after, profile)
    for node in after.nodes(names):
        try:
            renderer.render_node(node)
        except RenderError as exc:
            try:
                Renderer(settings, before).render_node(node)
            except RenderError:
                continue  # broken before this change: sync reports it as before
            raise RenderError(
                f"profile {profile}: the change breaks {exc.message}",
                "nothing was changed; fix the snippet or define the value in a profile, "
                "group or node first",
            ) from None
    return len(names)
