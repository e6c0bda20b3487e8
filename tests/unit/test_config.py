"""corral.toml: its [serve] table, and the URL nodes fetch from when none is set."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import Settings, load_settings
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
