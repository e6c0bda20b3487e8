"""Where corral keeps its state, and the settings a site may change.

Settings come from ``$CORRAL_HOME/corral.toml`` (or the file named by ``CORRAL_CONFIG``);
every key has a default, so a fresh machine needs no file at all. Every setting but
``database_url``, ``server_url`` and ``template_dir`` may also be written in a ``[serve]``
table: they are what ``corral serve`` and its deployments use.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from corral.errors import ConfigError


def default_home() -> Path:
    if "CORRAL_HOME" in os.environ:
        return Path(os.environ["CORRAL_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    return Path.home() / ".local" / "share" / "corral"


@dataclass(frozen=True)
class Settings:
    home: Path
    # SQLAlchemy URL; empty means SQLite in the home directory.
    database_url: str = ""
    # Base URL at which nodes reach corral's HTTP server; rendered into boot files. Not
    # set: http://ADDRESS:HTTP_PORT when address is one address, else this default.
    server_url: str = "http://10.0.0.1:8080"
    # Site templates that override the packaged ones, file by file.
    template_dir: str = ""
    # corral serve: where it listens, and what it runs.
    address: str = "0.0.0.0"
    http_port: int = 8080
    tftp_port: int = 69
    dhcp: str = "off"  # off | full | proxy
    dhcp_interface: str = ""
    dhcp_range: str = ""  # "FIRST,LAST": addresses for unknown machines (full mode)
    dhcp_ipv6_ra: bool = False  # router advertisements on a boot network without a router
    # HTTP access log: every request (all), all but the installing nodes' image chunks and
    # progress reports, which --debug shows too (quiet), or none (off).
    access_log: str = "quiet"  # all | quiet | off
    # Bearer token of the admin REST API; empty: generated into $CORRAL_HOME/api-token.
    api_token: str = ""
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto corral believes, as
    # comma-separated addresses or networks; empty: the headers are ignored (a client
    # could otherwise claim a node's address and take its install secrets).
    trusted_proxies: str = ""
    # Discovery (POST /api/v1/discover, unauthenticated): at most this many nodes in
    # state "discovered", and at most this many new ones a minute.
    discovery_max_nodes: int = 1000
    discovery_per_minute: int = 60
    # The deploy/discovery ramdisk (vmlinuz, initrd.img) that image installs boot.
    ramdisk_dir: str = ""
    # Deployments: the rsync daemon corral starts for the rsync transport, a node silent
    # this many seconds mid-install is failed (25: reported within 30 s, with the manager's
    # one-second tick), and one that never asks for its plan.
    rsync_port: int = 873
    deploy_node_timeout: float = 25.0
    deploy_boot_timeout: float = 900.0
    # A node its agent rebooted into its installed system is failed when that system has
    # not reported its first boot within this many seconds (0: wait for ever). Servers
    # take minutes to POST, and a first boot may resize or relabel file systems.
    firstboot_timeout: float = 900.0
    # Multicast (udpcast): the sending rate must stay under the slowest node link that
    # should keep up ("19m" suits 20 Mbit/s links, ~"900m" a gigabit network); the FEC
    # (INTERLEAVExREDUNDANCY/STRIPESIZE, "" for none); how long a session waits for its
    # nodes after the first one joined.
    multicast_max_bitrate: str = "19m"
    multicast_fec: str = "8x4/128"
    multicast_max_wait: float = 60.0

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'corral.db'}"

    @property
    def templates(self) -> Path:
        return Path(self.template_dir) if self.template_dir else self.home / "templates"

    @property
    def ramdisk(self) -> Path:
        return Path(self.ramdisk_dir) if self.ramdisk_dir else self.home / "ramdisk"


def make_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (for secrets: the home with the database and the
    API token, nodes' host keys); a directory that exists already keeps its mode."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def restrict_file(path: Path) -> None:
    """Give an existing file that holds secrets mode 0600 (if it is corral's to change)."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass
    except PermissionError:
        pass  # not ours: its owner decides


#: The settings that are not corral serve's: a [serve] table may not hold them.
GENERAL_KEYS = ("database_url", "server_url", "template_dir")


def listening_url(address: str, http_port: int) -> str | None:
    """corral serve's URL when it listens on ``address``; None for every address."""
    if address in ("", "0.0.0.0", "::"):
        return None
    host = f"[{address}]" if ":" in address else address  # an IPv6 literal
    return f"http://{host}:{http_port}"


def _flatten(data: dict[str, object], path: Path) -> dict[str, object]:
    """The file's settings with its [serve] table's keys moved to the top level."""
    table = data.get("serve")
    if table is None:
        return data
    if not isinstance(table, dict):
        raise ConfigError(f"'serve' in {path} must be a table: [serve]")
    flat = {k: v for k, v in data.items() if k != "serve"}
    for key, value in table.items():
        if key in GENERAL_KEYS:
            raise ConfigError(
                f"key '{key}' in [serve] of {path} is not a serve setting",
                "write it at the top of the file, before any [table]",
            )
        if key in flat:
            raise ConfigError(f"key '{key}' is set twice in {path}: at the top and in [serve]")
        flat[key] = value
    return flat


def load_settings(home: Path | None = None) -> Settings:
    home = home or default_home()
    path = Path(os.environ.get("CORRAL_CONFIG", home / "corral.toml"))
    values: dict[str, object] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        known = {f.name: type(f.default) for f in fields(Settings) if f.name != "home"}
        for key, value in _flatten(data, path).items():
            if key not in known:
                raise ConfigError(
                    f"unknown key '{key}' in {path}", f"known keys: {', '.join(sorted(known))}"
                )
            if type(value) is not known[key]:
                raise ConfigError(f"key '{key}' in {path} must be a {known[key].__name__}")
            values[key] = value
    if "server_url" not in values:
        # As corral serve does: nodes reach corral where it listens, if that is one address.
        address = values.get("address", Settings.address)
        port = values.get("http_port", Settings.http_port)
        assert isinstance(address, str) and isinstance(port, int)  # their types are checked
        values["server_url"] = listening_url(address, port) or Settings.server_url
    return Settings(home=home, **values)  # type: ignore[arg-type]
