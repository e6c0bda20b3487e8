"""corral serve's settings: the URL nodes fetch from, what it logs at start, and its
options reaching every part it starts."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pytest

from corral.cli import serve as serve_cli
from corral.config import SERVE_OPTIONS, SETTINGS, Settings
from corral.inventory import db
from corral.serve import dhcp, server, tftp


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, home: Path) -> list[Settings]:
    calls: list[Settings] = []
    monkeypatch.setattr(server, "serve", lambda settings, engine: calls.append(settings))
    monkeypatch.setattr(serve_cli, "engine", lambda: None)
    return calls


def _serve(**options: Any) -> None:
    defaults = dict.fromkeys(
        ("address", "http_port", "tftp_port", "dhcp", "dhcp_interface", "dhcp_range")
    )
    serve_cli.serve(**{**defaults, **options})


def test_serve_logs_the_url_nodes_use_and_where_the_token_is(
    started: list[Settings], home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.cli.serve")
    _serve(address="10.0.9.1", http_port=8081)
    cfg = started[0]
    assert cfg.server_url == "http://10.0.9.1:8081"
    assert "nodes fetch their boot files from http://10.0.9.1:8081" in caplog.text
    assert f"bearer token: {home / 'api-token'}" in caplog.text


def test_serve_options_override_the_config_address_but_not_a_set_server_url(
    started: list[Settings], home: Path
) -> None:
    home.mkdir(parents=True)
    (home / "corral.toml").write_text('[serve]\naddress = "10.0.9.1"\n')
    _serve(address="10.0.9.2")
    assert started[-1].server_url == "http://10.0.9.2:8080"
    db.close()
    (home / "corral.toml").write_text('server_url = "http://boot.lab"\n')
    _serve(address="10.0.9.2")
    assert started[-1].server_url == "http://boot.lab"


def test_the_options_are_the_settings_with_a_flag_and_override_only_their_key(
    started: list[Settings], home: Path
) -> None:
    flags = {s.name: s.flag for s in SETTINGS if s.flag}
    assert list(inspect.signature(serve_cli.serve).parameters) == list(flags)
    assert flags["http_port"] == "--http-port"
    home.mkdir(parents=True)
    (home / "corral.toml").write_text('[serve]\ntftp_port = 0\ndhcp = "proxy"\n')
    _serve(http_port=8081)
    options = started[-1]
    assert (options.http_port, options.tftp_port, options.dhcp) == (8081, 0, "proxy")
    assert options.dhcp_interface == ""


#: A value for each of corral serve's options, none of them the default.
GIVEN = {
    "address": "10.0.9.1",
    "http_port": 8081,
    "tftp_port": 6969,
    "dhcp": "full",
    "dhcp_interface": "br-boot",
    "dhcp_range": "10.0.9.200,10.0.9.250",
}


class Started:
    """What serve started, and with what: each part records its settings or arguments."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: dict[str, Any] = {}
        seen = self.seen

        def create_app(service: Any, token: str, deploy: Any, hub: Any = None) -> object:
            seen.update(boot=service.settings, deploy=deploy.settings)
            seen["transports"] = deploy.transports.settings
            return object()

        class Manager:
            def __init__(self, deploy: Any) -> None:
                pass

            def start(self) -> None:
                pass

            def is_alive(self) -> bool:
                return False

        class Tail:  # reads the database, which this test has none of
            def __init__(self, *args: Any) -> None:
                pass

            def start(self) -> None:
                pass

            def is_alive(self) -> bool:
                return False

        class Tftp:
            def __init__(
                self, root: Path, resolve: Any, host: str, port: int, on_done: Any = None
            ) -> None:
                seen["tftp"] = (host, port)
                self.port = port

            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

        class Dnsmasq:
            def __init__(self, cfg: dhcp.DhcpConfig, on_answer: Any = None) -> None:
                seen["dhcp"] = cfg

            def start(self, reservations: Any) -> None:
                pass

            def stop(self) -> None:
                pass

        class Watcher:
            def __init__(self, engine: Any, dnsmasq: Any) -> None:
                pass

            def tick(self) -> None:
                pass

            def start(self) -> None:
                pass

            def is_alive(self) -> bool:
                return False

        class Uvicorn:
            def __init__(self, config: Any) -> None:
                seen["http"] = (config.host, config.port)

            def run(self, sockets: Any) -> None:
                pass

        monkeypatch.setattr(server, "create_app", create_app)
        monkeypatch.setattr(server, "Manager", Manager)
        monkeypatch.setattr(server, "Tail", Tail)
        monkeypatch.setattr(server, "Watcher", Watcher)
        monkeypatch.setattr(server, "_Server", Uvicorn)
        monkeypatch.setattr(server, "_listen", lambda host, port: seen.update(socket=(host, port)))
        monkeypatch.setattr(tftp, "TftpServer", Tftp)
        monkeypatch.setattr(dhcp, "Dnsmasq", Dnsmasq)
        monkeypatch.setattr(serve_cli, "engine", lambda: None)


def test_every_option_reaches_every_part_of_serve(
    monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    """The boot and deploy services and the transports got the config's settings with only
    server_url from the options: --address never reached the rsync daemon, the chain's
    head or BitTorrent's tracker and seed, nor the interface multicast sends on."""
    assert set(GIVEN) == {s.name for s in SERVE_OPTIONS}
    started = Started(monkeypatch)
    _serve(**GIVEN)
    seen = started.seen
    for part in ("boot", "deploy", "transports"):
        settings = seen[part]
        assert {name: getattr(settings, name) for name in GIVEN} == GIVEN, part
        assert settings.server_url == "http://10.0.9.1:8081", part
    address, http_port, tftp_port = GIVEN["address"], GIVEN["http_port"], GIVEN["tftp_port"]
    assert seen["http"] == seen["socket"] == (address, http_port)
    assert seen["tftp"] == (address, tftp_port)
    cfg = seen["dhcp"]
    assert (cfg.mode, cfg.interface, cfg.server_ip, cfg.tftp_port) == (
        "full",
        "br-boot",
        address,
        tftp_port,
    )
    assert cfg.range == ("10.0.9.200", "10.0.9.250")
    assert cfg.http_url == "http://10.0.9.1:8081"
