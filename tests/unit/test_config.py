"""corral.toml: its [serve] table, and the URL nodes fetch from when none is set."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import SETTINGS, Settings, load_settings
from corral.errors import ConfigError


def _load(home: Path, text: str) -> Settings:
    home.mkdir(parents=True, exist_ok=True)
    (home / "corral.toml").write_text(text)
    return load_settings(home)


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)


def test_a_serve_table_holds_the_serve_settings(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        'database_url = ""\n[serve]\naddress = "10.0.0.5"\nhttp_port = 8081\ndhcp = "proxy"\n',
    )
    assert (settings.address, settings.http_port, settings.dhcp) == ("10.0.0.5", 8081, "proxy")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[serve]\nserver_url = "http://x"\n', "'server_url' in [serve]"),
        ('address = "10.0.0.5"\n[serve]\naddress = "10.0.0.6"\n', "set twice"),
        ("serve = 3\n", "must be a table"),
        ("[serve]\ncolour = 1\n", "unknown key 'colour'"),
    ],
)
def test_a_bad_serve_table_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _load(tmp_path, text)


def test_nodes_fetch_from_where_serve_listens_unless_server_url_is_set(tmp_path: Path) -> None:
    """render and sync name the URL corral serve would: not 10.0.0.1 for a server elsewhere."""
    assert load_settings(tmp_path / "none").server_url == "http://10.0.0.1:8080"
    listening = _load(tmp_path / "a", '[serve]\naddress = "192.168.5.1"\nhttp_port = 80\n')
    assert listening.server_url == "http://192.168.5.1:80"
    everywhere = _load(tmp_path / "b", 'address = "0.0.0.0"\n')
    assert everywhere.server_url == "http://10.0.0.1:8080"
    assert _load(tmp_path / "d", 'address = "::"\n').server_url == "http://10.0.0.1:8080"
    assert _load(tmp_path / "e", 'address = "fd00::1"\n').server_url == "http://[fd00::1]:8080"
    explicit = _load(tmp_path / "c", 'server_url = "http://boot.lab"\naddress = "192.168.5.1"\n')
    assert explicit.server_url == "http://boot.lab"


@pytest.mark.parametrize(
    ("text", "message", "fix"),
    [
        ('dhcp = "on"\n', "bad dhcp 'on' in {path}", "use off, full or proxy"),
        ('[serve]\naccess_log = "some"\n', "bad access_log 'some' in {path}", "use all, quiet"),
        ('http_port = "80"\n', "key 'http_port' in {path} must be a int", "http_port = 8080"),
        ("deploy_node_timeout = 30\n", "must be a float", "deploy_node_timeout = 25.0"),
        (
            'trusted_proxies = "10.0.0.2, the-proxy"\n',
            "bad trusted_proxies entry 'the-proxy' in {path}",
            "e.g. 10.0.0.2,10.0.5.0/24",
        ),
        (
            '[serve]\ndhcp_range = "10.0.0.200-10.0.0.250"\n',
            "bad dhcp_range '10.0.0.200-10.0.0.250' (no comma) in {path}",
            "give FIRST,LAST",
        ),
        ("colour = 1\n", "unknown key 'colour' in {path}", "known keys: access_log, address"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_file_and_fix(
    tmp_path: Path, text: str, message: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message.format(path=tmp_path / "corral.toml") in caught.value.message
    assert "\n" not in caught.value.message
    assert caught.value.hint is not None and fix in caught.value.hint


def test_every_key_is_declared_once_with_a_default_it_accepts() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert {"rsync_port", "deploy_boot_timeout", "access_log"} <= set(names)
    for s in SETTINGS:
        assert s.problem(s.default, "the table") is None, s.name
        assert s.help.endswith("."), s.name
