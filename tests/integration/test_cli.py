"""The real ``corral`` entry point: the commands a user types, and what bad input gets."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import DATA, corral

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


@pytest.fixture(scope="module")
def applied_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("applied") / "home"
    result = corral("apply", "-f", str(DATA / "cluster.yaml"), home=home)
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture
def cluster_home(applied_home: Path, tmp_path: Path) -> Path:
    """A home with the fixture cluster applied (a copy, so tests may change it)."""
    home = tmp_path / "home"
    shutil.copytree(applied_home, home)
    return home


def export(home: Path) -> str:
    result = corral("export", home=home)
    assert result.returncode == 0, result.stderr
    return result.stdout


def dump(home: Path) -> list[str]:
    """Every row of the inventory database, to prove that a failed command changed nothing."""
    with sqlite3.connect(home / "corral.db") as db:
        return list(db.iterdump())


def test_node_add_assigns_consecutive_ips_and_macs_from_a_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    macs = tmp_path / "macs.txt"
    macs.write_text("".join(f"52:54:00:00:10:{i:02x}\n" for i in range(1, 11)))
    result = corral(
        "node",
        "add",
        "n[001-010]",
        "--ip",
        "10.0.0.11",
        "--mac-file",
        str(macs),
        "--netmask",
        "24",
        home=home,
    )
    assert result.returncode == 0, result.stderr
    assert "added 10 nodes: n[001-010]" in result.stdout
    listing = corral("node", "list", "n[001-010],-n005", home=home).stdout
    assert "n004" in listing and "n005" not in listing
    assert "10.0.0.20" in listing and "52:54:00:00:10:0a" in listing


def test_apply_reports_and_is_idempotent(cluster_home: Path) -> None:
    again = corral("apply", "-f", str(DATA / "cluster.yaml"), home=cluster_home)
    assert again.returncode == 0
    assert "nodes          0 created      0 changed      6 unchanged" in again.stdout


def test_export_then_apply_changes_nothing(cluster_home: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export.yaml"
    assert corral("export", "-o", str(exported), home=cluster_home).returncode == 0
    result = corral("apply", "-f", str(exported), home=cluster_home)
    assert result.returncode == 0
    assert " 0 created      0 changed" in result.stdout
    assert "created" in result.stdout and " 1 changed" not in result.stdout


def test_profile_show_for_node_gives_origins(cluster_home: Path) -> None:
    result = corral("profile", "show", "compute", "--node", "c01", home=cluster_home)
    assert result.returncode == 0, result.stderr
    assert "site: 'hall-a'  # profile compute" in result.stdout
    assert "role: 'worker'  # group compute" in result.stdout
    assert "rack: 'r1'  # node c01" in result.stdout
    assert "distro: 'rhel9'  # profile base" in result.stdout


def test_render_prints_one_file(cluster_home: Path) -> None:
    result = corral("render", "c01", "--kind", "ipxe", home=cluster_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!ipxe\n")
    ks = corral("render", "c01", "--kind", "kickstart", home=cluster_home)
    assert "network --device=52:54:00:00:00:01 --bootproto=static --ip=10.0.0.11" in ks.stdout
    none = corral("render", "img01", "--kind", "kickstart", home=cluster_home)
    assert none.returncode == 2
    assert "installs by image" in none.stderr


def test_render_an_unknown_kind_is_a_usage_error(cluster_home: Path) -> None:
    result = corral("render", "c01", "--kind", "png", home=cluster_home)
    assert result.returncode == 2
    assert "error: unknown kind 'png'" in result.stderr
    assert "hint: use one of: " in result.stderr


def test_set_and_rm(cluster_home: Path) -> None:
    result = corral("node", "set", "c01", "--var", "row=r9", "--ip", "10.0.0.99", home=cluster_home)
    assert result.returncode == 0, result.stderr
    show = corral("node", "show", "c01", home=cluster_home).stdout
    assert "row: r9" in show and "ip: 10.0.0.99" in show
    assert corral("node", "rm", "c01,bonded", home=cluster_home).returncode == 0
    assert "c01" not in corral("node", "list", home=cluster_home).stdout


def test_root_password_is_stored_as_sha512_crypt(cluster_home: Path) -> None:
    result = corral(
        "profile", "set", "compute", "--root-password", home=cluster_home, stdin="hunter2\n"
    )
    assert result.returncode == 0, result.stderr
    shown = corral("profile", "show", "compute", home=cluster_home).stdout
    assert "root_password_hash: $6$" in shown
    assert "hunter2" not in shown
    assert "hunter2" not in export(cluster_home)


BAD_INPUTS = [
    (["node", "add", "x1", "--mac", "52:54:00:zz:00:01"], "invalid MAC address"),
    (["node", "add", "x1", "--ip", "10.0.0.256"], "invalid IPv4 address '10.0.0.256'"),
    (["node", "add", "x1", "--mac", "52:54:00:00:00:01"], "belongs to node c01"),
    (["node", "add", "x1", "--ip", "10.0.0.11"], "belongs to node c01"),
    (["node", "add", "x[1-3]", "--profile", "nosuch"], "unknown profile 'nosuch'"),
    (["profile", "add", "p9", "--distro", "nosuch"], "unknown distro 'nosuch'"),
    (["node", "add", "x[1-200000]"], "100000"),
    (["node", "add", "x[1-"], "bad noderange"),
    (["node", "set", "nosuch", "--var", "a=b"], "unknown node 'nosuch'"),
    (["node", "add", "x[1-5]", "--ip", "10.0.7.253"], "ip 10.0.7.255 is the broadcast address"),
    (["node", "add", "x1", "--mac", "ff:ff:ff:ff:ff:ff"], "is the broadcast address"),
    (["node", "add", "x1", "--mac", "01:00:5e:00:00:01"], "is a multicast address"),
    (["node", "add", "x1", "--ip", "0.0.0.0"], "is the unspecified address"),
    (["node", "set", "c01", "--gateway", "10.9.0.1"], "outside the interface's subnet"),
    (["profile", "rm", "base"], "cannot remove profile in use"),
    (
        [
            "distro",
            "add",
            "r8",
            "--family",
            "rhel",
            "--os-version",
            "RHEL99",
            "--kernel",
            "k",
            "--initrd",
            "i",
        ],
        "os_version 'RHEL99'",
    ),
]


@pytest.mark.parametrize(
    ("argv", "message"),
    BAD_INPUTS,
    ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD_INPUTS)],
)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(
    cluster_home: Path, argv: list[str], message: str
) -> None:
    before = dump(cluster_home)
    result = corral(*argv, home=cluster_home)
    assert result.returncode == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ") and message in first, result.stderr
    assert "Traceback" not in result.stderr
    assert dump(cluster_home) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nodes: [name: n1\n", "malformed YAML"),
        ("nodes:\n  - name: n1\n    colour: red\n", "nodes.0.colour: unknown field"),
        # The first node is valid: nothing of the file may land when a later entry fails.
        ("nodes:\n  - name: ok1\n  - name: bad\n    profiles: [nosuch]\n", "unknown profile"),
        ("nodes:\n  - {name: ok1, interfaces: [{mac: '52:54:00:00:00:01'}]}\n", "belongs to"),
    ],
)
def test_bad_cluster_file_changes_nothing(
    cluster_home: Path, tmp_path: Path, content: str, message: str
) -> None:
    before = dump(cluster_home)
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = corral("apply", "-f", str(path), home=cluster_home)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[0]
    assert dump(cluster_home) == before


def test_template_syntax_error_names_the_template(cluster_home: Path, tmp_path: Path) -> None:
    templates = cluster_home / "templates"
    templates.mkdir()
    (templates / "ipxe.j2").write_text("#!ipxe\n{% if %}\n")
    result = corral("render", "c01", "--kind", "ipxe", home=cluster_home)
    assert result.returncode == 2
    assert "ipxe.j2:2" in result.stderr.splitlines()[0]
    root = tmp_path / "root"
    sync = corral("sync", "--root", str(root), home=cluster_home)
    assert sync.returncode == 2
    assert not list(root.glob("ipxe/*"))


def test_unknown_command_option_is_a_usage_error(cluster_home: Path) -> None:
    result = corral("node", "add", "x1", "--colour", "red", home=cluster_home)
    assert result.returncode == 2


def test_profile_set_refuses_a_snippet_that_breaks_a_node(
    cluster_home: Path, tmp_path: Path
) -> None:
    """Rendered at `set` time, as sync would: not first at the next sync or boot."""
    snippet = tmp_path / "post.sh"
    snippet.write_text("echo {{ vars.nosuch }}\n")
    before = dump(cluster_home)
    result = corral("profile", "set", "compute", "--post", str(snippet), home=cluster_home)
    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: profile compute: the change breaks node c01: post snippet")
    assert "nosuch" in first
    assert dump(cluster_home) == before
    snippet.write_text("echo {{ vars.site }}\n")
    ok = corral("profile", "set", "compute", "--post", str(snippet), home=cluster_home)
    assert ok.returncode == 0, ok.stderr


def test_apply_names_what_it_created_and_changed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = corral("apply", "-f", str(DATA / "cluster.yaml"), home=home)
    assert first.returncode == 0, first.stderr
    assert "created nodes: bonded,c01,fed01,img01,local01,ram01" in first.stdout
    assert "created groups: compute, r1" in first.stdout
    assert corral("node", "set", "c01", "--var", "row=r9", home=home).returncode == 0
    again = corral("apply", "-f", str(DATA / "cluster.yaml"), home=home)
    assert "changed node: c01" in again.stdout
    assert "created" not in again.stdout.split("distros")[0]


def test_apply_prune_removes_what_the_file_omits_and_dry_run_changes_nothing(
    cluster_home: Path,
) -> None:
    extra = [("node", "add", "x[1-3]"), ("profile", "add", "extra"), ("group", "add", "g2")]
    for argv in extra:
        assert corral(*argv, home=cluster_home).returncode == 0
    before = dump(cluster_home)
    dry = corral(
        "apply", "-f", str(DATA / "cluster.yaml"), "--prune", "--dry-run", home=cluster_home
    )
    assert dry.returncode == 0, dry.stderr
    assert "would remove nodes: x[1-3]" in dry.stdout
    assert "would remove profile: extra" in dry.stdout and "would remove group: g2" in dry.stdout
    assert "nodes          0 created      0 changed      6 unchanged      3 removed" in dry.stdout
    assert dry.stdout.rstrip().endswith("dry run: nothing was changed")
    assert dump(cluster_home) == before
    plain = corral("apply", "-f", str(DATA / "cluster.yaml"), home=cluster_home)
    assert "remove" not in plain.stdout  # without --prune nothing goes
    pruned = corral("apply", "-f", str(DATA / "cluster.yaml"), "--prune", home=cluster_home)
    assert pruned.returncode == 0, pruned.stderr
    assert "removed nodes: x[1-3]" in pruned.stdout
    names = corral("node", "list", home=cluster_home).stdout
    assert "x1" not in names and "c01" in names
    assert "extra" not in corral("profile", "list", home=cluster_home).stdout


def test_export_writes_noderanges_that_apply_takes_back_unchanged(
    cluster_home: Path, tmp_path: Path
) -> None:
    added = corral(
        "node",
        "add",
        "n[001-110]",
        "--ip",
        "10.0.1.1",
        "--netmask",
        "16",
        "--mac",
        "52:54:00:01:00:01",
        "--group",
        "compute",
        home=cluster_home,
    )
    assert added.returncode == 0, added.stderr
    text = export(cluster_home)
    assert "- name: n[001-110]\n" in text
    assert len(text.splitlines()) < 100  # one entry per node took 500 lines
    path = tmp_path / "export.yaml"
    path.write_text(text)
    result = corral("apply", "-f", str(path), home=cluster_home)
    assert result.returncode == 0, result.stderr
    assert "nodes          0 created      0 changed    116 unchanged" in result.stdout
    assert export(cluster_home) == text


def test_node_set_and_group_set_refuse_a_change_that_breaks_a_node(
    cluster_home: Path, tmp_path: Path
) -> None:
    snippet = tmp_path / "post.sh"
    snippet.write_text("echo rack {{ vars.rack }}\n")
    assert (
        corral("profile", "add", "racked", "--post", str(snippet), home=cluster_home).returncode
        == 0
    )
    before = dump(cluster_home)
    node = corral(
        "node", "set", "bonded", "--profile", "base", "--profile", "racked", home=cluster_home
    )
    assert node.returncode == 2
    assert node.stderr.startswith("error: node bonded: the change breaks node bonded: post snippet")
    group = corral(
        "group", "set", "compute", "--profile", "base", "--profile", "racked", home=cluster_home
    )
    assert group.returncode == 2
    assert group.stderr.startswith("error: group compute: the change breaks node local01:")
    assert dump(cluster_home) == before
    ok = corral("node", "set", "c01", "--profile", "racked", home=cluster_home)  # c01 has a rack
    assert ok.returncode == 0, ok.stderr
