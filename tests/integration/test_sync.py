"""`corral sync`: the whole tree, incrementally, atomically, with validation per node."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import Settings
from corral.inventory import db
from corral.inventory.schema import NodeSpec, ProfileSpec
from corral.render import sync as sync_module
from corral.render.sync import Syncer, SyncReport

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


def sync(settings: Settings, root: Path, full: bool = False) -> SyncReport:
    with db.session() as s:
        return Syncer(settings, s, root).run(full=full)


def tree(root: Path) -> dict[str, int]:
    """Relative path -> inode of every file (inodes change when a file is rewritten)."""
    return {
        str(p.relative_to(root)): p.stat().st_ino
        for p in root.rglob("*")
        if p.is_file() and p.name != ".corral-sync.lock"
    }


@pytest.fixture
def root(tmp_path: Path, fixture_cluster: None) -> Path:
    return tmp_path / "root"


def test_full_then_nothing_to_do(settings: Settings, root: Path) -> None:
    first = sync(settings, root)
    assert first.full and not first.failures
    files = tree(root)
    assert first.written == len(files) == 38
    assert "pxelinux.cfg/01-52-54-00-00-00-01" in files
    assert "kickstart/c01.ks" in files and "kickstart/img01.ks" not in files
    again = sync(settings, root)
    assert (again.full, again.nodes, again.written) == (False, 0, 0)
    forced = sync(settings, root, full=True)
    assert (forced.written, forced.unchanged) == (0, 38)
    assert tree(root) == files
    assert not list(root.rglob("*.corral-tmp"))


def test_one_node_change_rewrites_only_its_changed_files(settings: Settings, root: Path) -> None:
    sync(settings, root)
    before = tree(root)
    with db.inventory() as inv:
        inv.update("node", ["c01"], {"variables": {"row": "r2"}, "netboot": False})
    report = sync(settings, root)
    assert report.nodes == 1
    after = tree(root)
    rewritten = {p for p in after if after[p] != before[p]}
    # netboot off changes the boot menus; kickstart and scripts render the same bytes.
    assert rewritten == {
        "ipxe/c01.ipxe",
        "pxelinux.cfg/01-52-54-00-00-00-01",
        "grub/grub.cfg-01-52-54-00-00-00-01",
    }
    assert report.written == 3


def test_removed_node_and_moved_mac(settings: Settings, root: Path) -> None:
    sync(settings, root)
    with db.inventory() as inv:
        inv.remove("node", ["bonded"])
        node = inv.node("fed01")
        node.interfaces[0].mac = "52:54:00:00:00:99"
        inv.put("node", [node])
    report = sync(settings, root)
    files = tree(root)
    assert not [p for p in files if "bonded" in p or "52-54-00-00-00-02" in p]
    assert "pxelinux.cfg/01-52-54-00-00-00-99" in files
    assert "pxelinux.cfg/01-52-54-00-00-00-04" not in files
    assert report.removed == 4 + 4 + 2  # bonded: 2 MACs x 2 menus + 4 own files; fed01: 2


def test_profile_change_rerenders_its_users_only(settings: Settings, root: Path) -> None:
    sync(settings, root)
    with db.inventory() as inv:
        inv.update("profile", ["compute"], {"packages": ["openmpi", "hwloc"]})
    report = sync(settings, root)
    # Only c01 uses compute: local01 is in the compute group but drops it with ~compute.
    assert report.nodes == 1
    assert report.written == 1  # c01's kickstart
    assert "hwloc" in (root / "kickstart/c01.ks").read_text()


def test_site_template_override_triggers_a_full_sync(
    settings: Settings, root: Path, home: Path
) -> None:
    sync(settings, root)
    (home / "templates").mkdir()
    (home / "templates" / "ipxe.j2").write_text("#!ipxe\necho site {{ node.name }}\nexit\n")
    report = sync(settings, root)
    assert report.full and report.written == 6
    assert (root / "ipxe/c01.ipxe").read_text() == "#!ipxe\necho site c01\nexit\n"


@pytest.mark.parametrize("parallel", [False, True])
def test_invalid_files_write_nothing_for_that_node(
    settings: Settings, root: Path, monkeypatch: pytest.MonkeyPatch, parallel: bool
) -> None:
    if parallel:  # exercise the forked workers on this small cluster
        monkeypatch.setattr(sync_module, "PARALLEL_MIN_NODES", 2)
        monkeypatch.setattr(sync_module, "CHUNK", 2)
    with db.inventory() as inv:
        # %end inside a snippet ends %pre early: pykickstart then meets a bogus command.
        inv.add("profile", [ProfileSpec(name="badks", pre=["%end\nnot-a-command"])])
        inv.add("profile", [ProfileSpec(name="badgrub", kernel_args=['"unbalanced'])])
        inv.add(
            "node",
            [
                NodeSpec(
                    name="ks1",
                    profiles=["base", "badks"],
                    interfaces=[{"mac": "52:54:00:00:01:01"}],
                ),  # type: ignore[list-item]
                NodeSpec(
                    name="grub1",
                    profiles=["debian", "badgrub"],
                    install_method="image",
                    interfaces=[{"mac": "52:54:00:00:01:02"}],
                ),  # type: ignore[list-item,arg-type]
            ],
        )
    report = sync(settings, root)
    messages = sorted(str(f) for f in report.failures)
    assert len(messages) == 2
    assert messages[0].startswith("node grub1: grub/grub.cfg-01-52-54-00-00-01-02:")
    assert messages[1].startswith("node ks1: kickstart/ks1.ks:")
    assert "not-a-command" in messages[1] or "Unknown command" in messages[1]
    files = tree(root)
    assert not [p for p in files if "ks1" in p or "grub1" in p or "00-00-01-0" in p]
    assert "kickstart/c01.ks" in files
    # The root stays behind, so the next sync retries the failed nodes.
    with db.inventory() as inv:
        inv.remove("node", ["ks1", "grub1"])
    retry = sync(settings, root)
    assert retry.failures == [] and retry.nodes == 6
