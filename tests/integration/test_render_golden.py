"""Golden files for every template, over fixture nodes that exercise each branch.

Every kickstart rendered here is validated with pykickstart and every GRUB file with
grub-script-check. Set CORRAL_UPDATE_GOLDEN=1 to rewrite the golden files after an
intended change, and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.config import Settings
from corral.inventory.store import Inventory
from corral.render.renderer import Renderer, Snapshot
from corral.render.validate import check_grub, check_kickstarts

GOLDEN = Path(__file__).parent.parent / "golden"
NODES = ["c01", "bonded", "fed01", "img01", "ram01", "local01"]
SECRET = "00" * 32

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


@pytest.fixture
def renderer(home: Path, fixture_cluster: None, inv: Inventory, settings: Settings) -> Renderer:
    (home / "secret").write_text(SECRET)  # fixed, so that tokens in golden files are stable
    return Renderer(settings, Snapshot(inv.session))


@pytest.mark.parametrize("name", NODES)
def test_node_files_match_golden(renderer: Renderer, inv: Inventory, name: str) -> None:
    node = inv.node(name)
    files = renderer.render_node(node)
    if name == NODES[0]:
        files += renderer.render_shared()
    distro = renderer.distro_of(node, renderer.merged(node))
    kickstarts = [(distro.os_version, f.path, f.content) for f in files if f.kind == "kickstart"]
    assert check_kickstarts(kickstarts) == [] if distro else not kickstarts
    assert check_grub([(f.path, f.content) for f in files if f.kind == "grub"]) == []

    directory = GOLDEN / name
    expected = {p.name for p in directory.iterdir()} if directory.exists() else set()
    rendered = {f.path.replace("/", "__"): f.content for f in files}
    if os.environ.get("CORRAL_UPDATE_GOLDEN"):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in expected - set(rendered):
            (directory / stale).unlink()
        for fname, content in rendered.items():
            (directory / fname).write_text(content)
        return
    assert set(rendered) == expected, "files differ from the golden set"
    for fname, content in rendered.items():
        assert content == (directory / fname).read_text(), f"{name}/{fname} differs from golden"


def test_every_template_has_golden_coverage() -> None:
    """Each packaged template's header line shows up in some golden file."""
    from corral.render.environment import PACKAGED

    golden_text = "".join(p.read_text() for p in GOLDEN.rglob("*") if p.is_file())
    for template in PACKAGED.glob("*.j2"):
        first = (
            next(line for line in template.read_text().splitlines() if line.startswith("# corral"))
            if "# corral" in template.read_text()
            else None
        )
        if first is None:
            continue
        prefix = first.split("{{")[0]
        assert prefix in golden_text, f"no golden file covers {template.name}"
