"""Issue 12, item 8: a few hundred bytes of YAML aliases (a "billion laughs") must not
become megabytes in the database, or exhaust memory: the cluster file loader bounds
alias expansion, and the schema bounds the size of variables."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from corral.errors import InvalidClusterFile, InvalidValue
from corral.inventory.clusterfile import MAX_ALIAS_EXPANSION, load_cluster
from corral.inventory.schema import MAX_VARIABLES_BYTES, NodeSpec, parse
from tests.conftest import corral

#: its integration tests share nothing of the host: `make test` runs them on every core
pytestmark = pytest.mark.parallel_safe


def bomb(levels: int) -> str:
    """A profile whose variables hold 9**levels strings, in a few hundred bytes."""
    lines = ["profiles:", "- name: p", "  variables:", '    l0: &l0 ["lol","lol","lol","lol"]']
    for n in range(1, levels):
        refs = ",".join([f"*l{n - 1}"] * 9)
        lines.append(f"    l{n}: &l{n} [{refs}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly_without_expanding_it() -> None:
    text = bomb(12)  # 4 * 9**11: some 10**11 strings, far beyond any memory
    assert len(text) < 1000
    start = time.monotonic()
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster(text, "bomb.yaml")
    assert time.monotonic() - start < 2
    assert str(info.value).startswith("bomb.yaml: its aliases expand to ")
    assert f"more than the {MAX_ALIAS_EXPANSION} allowed" in str(info.value)


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(InvalidClusterFile, match="refers to the node that contains it"):
        load_cluster("profiles:\n- name: p\n  variables: {a: &a [1, *a]}\n", "loop.yaml")


def test_a_small_bomb_under_the_alias_bound_meets_the_variables_bound() -> None:
    with pytest.raises(InvalidClusterFile, match=r"variables take \d+ bytes, more than"):
        load_cluster(bomb(5), "small.yaml")


def test_ordinary_aliases_still_work() -> None:
    nodes = "".join(f"- {{name: n{i:03}, profiles: *p}}\n" for i in range(1, 200))
    text = (
        "profiles:\n- {name: base, kernel_args: [quiet], variables: &v {site: lab}}\n"
        "groups:\n- {name: g, variables: *v}\n"
        "nodes:\n- {name: n000, profiles: &p [base]}\n" + nodes
    )
    cluster = load_cluster(text, "ok.yaml")
    assert len(cluster.nodes) == 200 and cluster.groups[0].variables == {"site": "lab"}
    assert all(n.profiles == ["base"] for n in cluster.nodes)


def test_variables_are_bounded_by_their_serialized_size() -> None:
    big = {"blob": "x" * MAX_VARIABLES_BYTES}
    with pytest.raises(InvalidValue, match="variables take"):
        parse(NodeSpec, {"name": "n1", "variables": big}, "node n1")
    parse(NodeSpec, {"name": "n1", "variables": {"blob": "x" * 1000}}, "node n1")


@pytest.mark.integration
def test_apply_of_a_bomb_exits_2_with_one_line_and_applies_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok = corral("profile", "add", "keep", home=home)
    assert ok.returncode == 0, ok.stderr
    with sqlite3.connect(home / "corral.db") as db:
        before = list(db.iterdump())
    path = tmp_path / "bomb.yaml"
    path.write_text("nodes:\n- {name: n1}\n" + bomb(10))
    result = corral("apply", "-f", str(path), home=home)
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first.startswith(f"error: {path}: its aliases expand to")
    assert all(line.startswith("hint: ") for line in rest)
    with sqlite3.connect(home / "corral.db") as db:
        assert list(db.iterdump()) == before
    assert (home / "corral.db").stat().st_size < 1_000_000


def flow_bomb(levels: int) -> str:
    """The same bomb as one flow sequence: what fits in a --var KEY=VALUE argument."""
    parts = ["&l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    parts += [f"&l{n} [{','.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return f"[{', '.join(parts)}]"


@pytest.mark.integration
def test_a_var_value_cannot_be_an_alias_bomb(tmp_path: Path) -> None:
    """--var values are read as YAML too: the same bound applies."""
    home = tmp_path / "home"
    value = flow_bomb(12)
    assert len(value) < 1000
    start = time.monotonic()
    result = corral("node", "add", "x1", "--var", f"data={value}", home=home)
    assert time.monotonic() - start < 10
    assert result.returncode == 2
    assert result.stderr.startswith("error: bad variable 'data': its aliases expand to")
    assert "x1" not in corral("node", "list", home=home).stdout
