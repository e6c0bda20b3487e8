"""corral serve's settings: the URL nodes fetch from, and what it logs at start."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pytest

from corral.cli import serve as serve_cli
from corral.config import SETTINGS, Settings
from corral.serve import server


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, home: Path) -> list[tuple[Settings, Any]]:
    calls: list[tuple[Settings, Any]] = []
    monkeypatch.setattr(server, "serve", lambda cfg, engine, options: calls.append((cfg, options)))
    monkeypatch.setattr(serve_cli, "engine", lambda: None)
    return calls


def _serve(**options: Any) -> None:
    defaults = dict.fromkeys(
        ("address", "http_port", "tftp_port", "dhcp", "dhcp_interface", "dhcp_range")
    )
    serve_cli.serve(**{**defaults, **options})


def test_serve_logs_the_url_nodes_use_and_where_the_token_is(
    started: list[tuple[Settings, Any]], home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.cli.serve")
    _serve(address="10.0.9.1", http_port=8081)
    cfg, _ = started[0]
    assert cfg.server_url == "http://10.0.9.1:8081"
    assert "nodes fetch their boot files from http://10.0.9.1:8081" in caplog.text
    assert f"bearer token: {home / 'api-token'}" in caplog.text


def test_serve_options_override_the_config_address_but_not_a_set_server_url(
    started: list[tuple[Settings, Any]], home: Path
) -> None:
    home.mkdir(parents=True)
    (home / "corral.toml").write_text('[serve]\naddress = "10.0.9.1"\n')
    _serve(address="10.0.9.2")
    assert started[-1][0].server_url == "http://10.0.9.2:8080"
    serve_cli.settings.cache_clear()
    (home / "corral.toml").write_text('server_url = "http://boot.lab"\n')
    _serve(address="10.0.9.2")
    assert started[-1][0].server_url == "http://boot.lab"


def test_the_options_are_the_settings_with_a_flag_and_override_only_their_key(
    started: list[tuple[Settings, Any]], home: Path
) -> None:
    flags = {s.name: s.flag for s in SETTINGS if s.flag}
    assert list(inspect.signature(serve_cli.serve).parameters) == list(flags)
    assert flags["http_port"] == "--http-port"
    home.mkdir(parents=True)
    (home / "corral.toml").write_text('[serve]\ntftp_port = 0\ndhcp = "proxy"\n')
    _serve(http_port=8081)
    _, options = started[-1]
    assert (options.http_port, options.tftp_port, options.dhcp) == (8081, 0, "proxy")
    assert options.dhcp_interface == ""
