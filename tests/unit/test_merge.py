from __future__ import annotations

from corral.inventory.merge import merge_node, profile_chain
from corral.inventory.schema import GroupSpec, NodeSpec, ProfileSpec

PROFILES = {
    "base": ProfileSpec(
        name="base",
        distro="d1",
        packages=["a"],
        kernel_args=["x=1"],
        timezone="UTC",
        variables={"site": "lab", "k": 1},
    ),
    "extra": ProfileSpec(name="extra", distro="d2", packages=["b"], variables={"site": "hall"}),
    "gpu": ProfileSpec(name="gpu", packages=["c"]),
}
GROUPS = {
    "compute": GroupSpec(name="compute", profiles=["base", "extra"], variables={"role": "w"}),
}


def test_chain_is_groups_then_node_and_tilde_drops() -> None:
    node = NodeSpec(name="n1", groups=["compute"], profiles=["gpu", "~extra"])
    assert profile_chain(node, GROUPS) == ["base", "gpu"]


def test_later_scalars_win_lists_concatenate_variables_merge() -> None:
    node = NodeSpec(name="n1", groups=["compute"], profiles=["gpu"], variables={"k": 2})
    merged = merge_node(node, GROUPS, PROFILES)
    assert merged.values["distro"] == "d2"
    assert merged.origins["distro"] == "profile extra"
    assert merged.values["timezone"] == "UTC"
    assert merged.values["packages"] == ["a", "b", "c"]
    assert merged.origins["packages"] == ["profile base", "profile extra", "profile gpu"]
    assert merged.values["variables"] == {"site": "hall", "k": 2, "role": "w"}
    assert merged.origins["variables"] == {
        "site": "profile extra",
        "k": "node n1",
        "role": "group compute",
    }


def test_cache_shares_merges_without_leaking_node_variables() -> None:
    cache: dict[tuple[str, ...], object] = {}
    a = merge_node(
        NodeSpec(name="a", groups=["compute"], variables={"k": "a"}), GROUPS, PROFILES, cache
    )  # type: ignore[arg-type]
    b = merge_node(NodeSpec(name="b", groups=["compute"]), GROUPS, PROFILES, cache)  # type: ignore[arg-type]
    assert len(cache) == 1
    assert a.values["variables"]["k"] == "a"
    assert b.values["variables"]["k"] == 1


def test_profiles_choose_an_image_and_layers() -> None:
    profiles = {
        "base": ProfileSpec(name="base", image="debian:2", layers=["compute"]),
        "gpu": ProfileSpec(name="gpu", image="debian-gpu", layers=["gpu"]),
    }
    merged = merge_node(NodeSpec(name="g1", profiles=["base", "gpu"]), {}, profiles)
    assert merged.values["image"] == "debian-gpu"
    assert merged.values["layers"] == ["compute", "gpu"]
