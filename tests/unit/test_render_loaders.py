"""Network boot loaders and a distro whose kernel is a URL: GRUB fetches plain HTTP
itself, pxelinux cannot, and nothing serves distros/NAME/vmlinuz for such a distro."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.errors import RenderError
from corral.inventory.schema import DistroSpec, NodeSpec, ProfileSpec
from corral.inventory.store import Inventory
from corral.render.renderer import Renderer, Snapshot, grub_location


@pytest.mark.parametrize(
    ("url", "path", "expected"),
    [
        ("http://mirror.example/rhel9/vmlinuz", None, "(http,mirror.example)/rhel9/vmlinuz"),
        ("http://mirror.example:80/a/initrd.img", None, "(http,mirror.example)/a/initrd.img"),
        ("http://mirror.example:8000/vmlinuz", None, None),
        ("https://mirror.example/vmlinuz", None, None),
        ("http://10.0.0.1:8080/distros/f/vmlinuz", "distros/f/vmlinuz", "/distros/f/vmlinuz"),
    ],
)
def test_grub_location(url: str, path: str | None, expected: str | None) -> None:
    assert grub_location(url, path) == expected


def _renderer(inv: Inventory, settings: Settings) -> Renderer:
    return Renderer(settings, Snapshot(inv.session))


def test_url_kernels_are_fetched_by_grub_and_explained_to_pxelinux(
    fixture_cluster: None, inv: Inventory, settings: Settings
) -> None:
    renderer = _renderer(inv, settings)
    node = inv.node("c01")  # rhel9: kernel and initrd on http://mirror.example/
    grub = renderer.render_one(node, "grub")
    assert "linux (http,mirror.example)/rhel9/images/pxeboot/vmlinuz " in grub
    assert "initrd (http,mirror.example)/rhel9/images/pxeboot/initrd.img" in grub
    assert "distros/rhel9" not in grub
    pxelinux = renderer.render_one(node, "pxelinux")
    assert "distros/rhel9" not in pxelinux and "KERNEL" not in pxelinux
    assert "# corral: c01 cannot boot with pxelinux: pxelinux loads files over TFTP only" in (
        pxelinux
    )
    assert "boot_loader: ipxe" in pxelinux


@pytest.mark.parametrize(
    ("loader", "kernel", "message"),
    [
        ("pxelinux", "http://mirror.example/vmlinuz", "pxelinux loads files over TFTP only"),
        ("grub", "https://mirror.example/vmlinuz", "GRUB cannot fetch https://"),
        ("grub", "http://mirror.example:8000/vmlinuz", "plain HTTP on port 80 only"),
    ],
)
def test_a_node_whose_loader_cannot_load_its_kernel_is_refused_at_render(
    inv: Inventory, settings: Settings, loader: str, kernel: str, message: str
) -> None:
    inv.put(
        "distro",
        [
            DistroSpec(
                name="r9", family="rhel", os_version="RHEL9", kernel=kernel, initrd="/srv/i.img"
            )
        ],
    )
    inv.put("profile", [ProfileSpec(name="p", distro="r9")])
    spec = {"name": "n1", "profiles": ["p"], "boot_loader": loader}
    inv.put(
        "node", [NodeSpec.model_validate(dict(spec, interfaces=[{"mac": "52:54:00:00:00:09"}]))]
    )
    with pytest.raises(RenderError) as info:
        _renderer(inv, settings).render_node(inv.node("n1"))
    assert str(info.value).startswith(f"node n1 boots with {loader}: ")
    assert message in str(info.value)
    assert info.value.hint and "boot_loader: ipxe" in info.value.hint
