"""checked_change: the change made in its block is refused if it breaks a node's boot
files, as every `set` command and the REST API's PATCH make their changes."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.errors import RenderError
from corral.inventory.store import Inventory
from corral.render import check
from corral.render.check import checked_change


def test_a_change_that_breaks_a_node_is_refused(
    fixture_cluster: None, settings: Settings, inv: Inventory
) -> None:
    with (
        pytest.raises(RenderError, match="profile compute: the change breaks node c01"),
        checked_change(settings, inv, "profile", "compute", "profile compute"),
    ):
        inv.edit("profile", ["compute"], {"post": ["echo {{ vars.nope }}"]})


def test_a_change_that_breaks_nothing_passes(
    fixture_cluster: None, settings: Settings, inv: Inventory
) -> None:
    with checked_change(settings, inv, "profile", "compute", "profile compute"):
        assert inv.edit("profile", ["compute"], {"post": ["echo {{ node.name }}"]}) == 1


def test_a_block_that_changed_nothing_renders_nothing(
    fixture_cluster: None, settings: Settings, inv: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rendered(*args: object) -> None:
        raise AssertionError("rendered")

    monkeypatch.setattr(check, "refuse_breaking_change", rendered)
    with checked_change(settings, inv, "node", ["c01"], "node c01"):
        assert inv.edit("node", ["c01"], {"variables": {"rack": "r1"}}) == 0
