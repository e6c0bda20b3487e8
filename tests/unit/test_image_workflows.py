"""The image workflows every door calls: a change makes a new version from a copy whose
identity is stripped, and a capture's source is checked before anything connects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from corral.images.capture.errors import SourceError
from corral.images.catalog import image_store
from corral.images.store import InvalidImageName
from corral.images.workflows import capture_source, change_image, import_version
from corral.inventory import db
from corral.inventory.schema import InterfaceSpec, NodeSpec
from corral.inventory.store import Inventory


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "etc" / "ssh").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("golden\n")
    (root / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("secret\n")
    return root


def test_a_change_is_a_new_version_of_a_stripped_copy(home: Path, tree: Path) -> None:
    store = image_store(home)
    base = import_version(store, "tiny", tree)
    seen: list[Path] = []

    def work(copy: Path) -> None:
        seen.append(copy)
        (copy / "marker").write_text("hi\n")

    change = change_image(store, "tiny", "test", work)
    assert (change.base.ref, change.version.ref) == ("tiny:1", "tiny:2")
    assert seen[0] != base.rootfs  # the work had a copy
    new = change.version.rootfs
    assert (new / "marker").read_text() == "hi\n"
    assert not (base.rootfs / "marker").exists()
    assert (new / "etc" / "hostname").read_text() == "localhost\n"
    assert (new / "etc" / "machine-id").read_text() == ""
    assert not list((new / "etc" / "ssh").glob("ssh_host_*"))
    assert change.version.manifest["origin"] == "test on v1"
    assert not list(store.root.glob(".staging-*"))


def test_a_change_that_fails_leaves_no_version_and_no_staging(home: Path, tree: Path) -> None:
    store = image_store(home)
    import_version(store, "tiny", tree)

    def work(copy: Path) -> None:
        raise SourceError("the work failed")

    with pytest.raises(SourceError):
        change_image(store, "tiny", "test", work)
    assert [v.ref for v in store.list()] == ["tiny:1"]
    assert not list(store.root.glob(".staging-*"))


def test_a_capture_source_is_an_inventory_node_at_its_first_ip(inv: Inventory) -> None:
    inv.add(
        "node",
        [
            NodeSpec(
                name="n01",
                interfaces=[InterfaceSpec(name="eth0"), InterfaceSpec(name="eth1", ip="10.0.0.7")],
            )
        ],
    )

    @contextmanager
    def the_inventory() -> Iterator[Inventory]:
        yield inv

    source = capture_source(db.settings().home, "golden", "n01", the_inventory)
    assert (source.host, source.node) == ("10.0.0.7", "n01")
    assert source.known_hosts == db.settings().home / "ssh" / "known_hosts"
    other = capture_source(db.settings().home, "golden", "builder.lab", the_inventory)
    assert (other.host, other.node) == ("builder.lab", None)


def no_inventory() -> AbstractContextManager[Inventory]:
    raise AssertionError("the inventory was opened")


def test_a_capture_by_address_opens_no_inventory(home: Path) -> None:
    source = capture_source(home, "golden", "10.0.0.7", no_inventory)
    assert (source.host, source.node) == ("10.0.0.7", None)


def test_a_capture_source_refuses_a_bad_image_name_and_an_unreadable_key(
    home: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidImageName):
        capture_source(home, "Bad Name", "10.0.0.7", no_inventory)
    with pytest.raises(SourceError, match="cannot read the SSH key"):
        capture_source(home, "golden", "10.0.0.7", no_inventory, key=tmp_path / "none")
