"""Power settings in the inventory: merged field by field, complete for their driver,
and the BMC password sealed at rest, never shown, kept by export and apply."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from corral.errors import ConfigError, InvalidValue
from corral.inventory import db
from corral.inventory.clusterfile import apply_cluster, export_cluster, load_cluster
from corral.inventory.power import node_power
from corral.inventory.schema import STORED, GroupSpec, NodeSpec
from corral.inventory.store import Inventory
from corral.vault import KEY_FILE, Vault

CLUSTER = """
groups:
  - name: compute
    power: {driver: ipmi, user: admin, password: s3cret-pw, cipher_suite: 17}
nodes:
  - name: n01
    groups: [compute]
    power: {address: 10.1.0.11}
  - name: n02
    groups: [compute]
    power: {address: 10.1.0.12, user: root}
"""


def _apply(inv: Inventory, text: str = CLUSTER) -> dict[str, dict[str, int]]:
    return {str(k): dict(v) for k, v in apply_cluster(inv, load_cluster(text, "t")).items()}


def _merged(inv: Inventory, name: str) -> tuple[dict[str, object] | None, dict[str, str]]:
    node = inv.node(name)
    groups = {g.name: g for g in inv.specs("group")}
    profiles = {p.name: p for p in inv.specs("profile")}
    return node_power(node, groups, profiles)


def test_fields_merge_from_group_to_node_with_their_origins(inv: Inventory) -> None:
    _apply(inv)
    power, origins = _merged(inv, "n02")
    assert power is not None
    assert (power["driver"], power["address"], power["user"]) == ("ipmi", "10.1.0.12", "root")
    assert origins["driver"] == "group compute" and origins["user"] == "node n02"


def test_the_password_is_sealed_in_the_database_and_opens_with_the_home_key(
    inv: Inventory, home: Path
) -> None:
    _apply(inv)
    row = inv._row("group", "compute")
    sealed = row.spec["power"]["password"]
    assert sealed.startswith("fernet:") and "s3cret-pw" not in str(row.spec)
    assert Vault(home).open(sealed) == "s3cret-pw"
    assert stat.S_IMODE((home / KEY_FILE).stat().st_mode) == 0o600


def test_export_writes_a_reference_and_apply_keeps_the_stored_password(
    inv: Inventory, home: Path
) -> None:
    _apply(inv)
    exported = export_cluster(inv)
    assert "s3cret-pw" not in exported and "fernet:" not in exported
    group = yaml.safe_load(exported)["groups"][0]
    assert group["power"]["password"] == STORED
    sealed = inv._row("group", "compute").spec["power"]["password"]
    # the export applied back changes nothing, and the password is still the one stored
    again = _apply(inv, exported)
    assert all(c["changed"] == 0 and c["created"] == 0 for c in again.values())
    assert inv._row("group", "compute").spec["power"]["password"] == sealed
    # a file without a password keeps the stored one too
    _apply(inv, CLUSTER.replace(", password: s3cret-pw", ""))
    assert Vault(home).open(inv._row("group", "compute").spec["power"]["password"]) == "s3cret-pw"


def test_reapplying_the_same_password_changes_nothing_and_a_new_one_is_sealed(
    inv: Inventory, home: Path
) -> None:
    _apply(inv)
    assert _apply(inv)["group"] == {"created": 0, "changed": 0, "unchanged": 1}
    assert _apply(inv, CLUSTER.replace("s3cret-pw", "other-pw"))["group"]["changed"] == 1
    assert Vault(home).open(inv._row("group", "compute").spec["power"]["password"]) == "other-pw"


def test_no_view_shows_the_password(inv: Inventory) -> None:
    _apply(inv)
    for dumped in (
        inv.get("group", "compute").model_dump(mode="json"),
        inv.get("group", "compute").model_dump(),
    ):
        assert dumped["power"]["password"] == STORED
    assert "s3cret-pw" not in repr(inv.get("group", "compute"))


def test_a_reference_with_nothing_stored_is_refused(inv: Inventory) -> None:
    with pytest.raises(InvalidValue, match=r"no BMC password is stored"):
        _apply(inv, CLUSTER.replace("s3cret-pw", STORED))


def test_a_driver_missing_its_fields_is_refused_and_nothing_is_stored(home: Path) -> None:
    text = CLUSTER.replace("    power: {address: 10.1.0.12, user: root}\n", "")
    with pytest.raises(InvalidValue) as caught, db.inventory() as inv:
        _apply(inv, text)
    assert caught.value.exit_code == 2
    assert "node n02: power driver ipmi (set on group compute) needs address" in str(caught.value)
    assert "--bmc-address ADDRESS" in str(caught.value)
    with db.inventory() as inv:
        assert inv.names("node") == [] and inv.names("group") == []


def test_an_unknown_driver_is_refused(inv: Inventory) -> None:
    with pytest.raises(Exception, match=r"power.driver"):
        load_cluster("nodes:\n  - name: n01\n    power: {driver: wol}\n", "t")


def test_node_set_merges_power_fields_and_keeps_the_password(inv: Inventory, home: Path) -> None:
    _apply(inv)
    inv.edit("node", ["n01"], {"power": {"address": "10.1.0.99"}})
    node = inv.node("n01")
    assert node.power is not None and node.power.address == "10.1.0.99"
    inv.edit("group", ["compute"], {"power": {"user": "ops"}})
    group = inv._row("group", "compute").spec["power"]
    assert group["user"] == "ops" and Vault(home).open(group["password"]) == "s3cret-pw"


def test_a_lost_key_is_told_with_the_fix(inv: Inventory, home: Path) -> None:
    _apply(inv)
    (home / KEY_FILE).unlink()
    with pytest.raises(ConfigError, match=r"key that sealed .* is missing") as caught:
        Vault(home).open(inv._row("group", "compute").spec["power"]["password"])
    assert "--ask-bmc-password" in (caught.value.hint or "")


def test_specs_validate_power_fields() -> None:
    with pytest.raises(ValueError, match="cipher_suite"):
        GroupSpec.model_validate({"name": "g", "power": {"cipher_suite": 99}})
    with pytest.raises(ValueError, match="newline"):
        NodeSpec.model_validate({"name": "n", "power": {"password": "a\nb"}})
