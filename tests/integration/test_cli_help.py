"""What a newcomer reads: every --help, --version, and the examples they copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import DATA, corral

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

README = Path(__file__).parents[2] / "README.md"

COMMANDS = [
    [],
    ["apply"],
    ["export"],
    ["render"],
    ["sync"],
    ["serve"],
    ["deploy"],
    *[[noun] for noun in ("distro", "profile", "group", "node", "image", "layer", "deployment")],
    *[["layer", verb] for verb in ("add", "show", "list", "rm")],
    *[["node", verb] for verb in ("add", "set", "show", "list", "rm", "status", "reinstall")],
    *[["profile", verb] for verb in ("add", "set", "show")],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a) or "corral" for a in COMMANDS])
def test_every_help_is_plain_and_complete(tmp_path: Path, argv: list[str]) -> None:
    result = corral(*argv, "--help", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "<bool>" not in text  # flags take no value
    commands = re.search(r"^Commands:\n((?:  .*\n?)*)", text, re.M)
    if commands:  # every subcommand says what it does
        for line in commands.group(1).splitlines():
            assert len(line.split(None, 1)) == 2, f"no help for {line.strip()}"


def test_serve_help_shows_config_keys_and_defaults(tmp_path: Path) -> None:
    text = corral("serve", "--help", home=tmp_path / "home").stdout
    flat = " ".join(text.split())
    assert "[config: address; default: 0.0.0.0]" in flat
    assert "[config: http_port; default: 8080]" in flat
    assert "[config: tftp_port; default: 69]" in flat


def test_version(tmp_path: Path) -> None:
    result = corral("--version", home=tmp_path / "home")
    assert result.returncode == 0
    assert re.fullmatch(r"corral \d+\.\d+\.\d+\S*\n", result.stdout)


def test_netboot_is_a_flag_pair(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert corral("node", "add", "x1", "--no-netboot", home=home).returncode == 0
    assert "no" in corral("node", "list", home=home).stdout.splitlines()[1]
    assert "--netboot / --no-netboot" in corral("node", "set", "--help", home=home).stdout


def test_readme_and_help_examples_quote_noderanges(tmp_path: Path) -> None:
    """Unquoted, n[101-110] is a shell glob: it may match a file and vanish."""
    unquoted = re.compile(r"""(?<!['"\w])\w+\[[0-9][^\]]*\](?!['"\w])""")
    commands = [line for line in README.read_text().splitlines() if line.startswith("corral ")]
    assert commands
    for line in commands:
        assert not unquoted.search(line.split("#")[0]), line
    for argv in (["node", "add"], ["deploy"]):
        usage = corral(*argv, "--help", home=tmp_path / "home").stdout
        examples = [line for line in usage.splitlines() if "corral " in line]
        assert examples and not any(unquoted.search(line) for line in examples), examples


def test_render_uses_the_address_serve_listens_on(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert corral("apply", "-f", str(DATA / "cluster.yaml"), home=home).returncode == 0
    (home / "corral.toml").write_text('[serve]\naddress = "192.168.5.1"\nhttp_port = 8081\n')
    ipxe = corral("render", "c01", "--kind", "ipxe", home=home)
    assert ipxe.returncode == 0, ipxe.stderr
    assert "inst.ks=http://192.168.5.1:8081/ks/c01" in ipxe.stdout
    assert "10.0.0.1:8080" not in ipxe.stdout
