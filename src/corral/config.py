"""Where corral keeps its state, and the settings a site may change.

Settings come from ``$CORRAL_HOME/corral.toml`` (or the file named by ``CORRAL_CONFIG``);
every key has a default, so a fresh machine needs no file at all. Every setting but
``database_url``, ``server_url`` and ``template_dir`` may also be written in a ``[serve]``
table: they are what ``corral serve`` and its deployments use.

Each setting is declared once, as a field of :class:`Settings` made by :func:`setting`
(type, default, choices, check, help, and ``corral serve``'s option if it has one).
:data:`SETTINGS` is that table: the file's checks, ``corral serve``'s options and the
README's list of settings (``python -m corral.config --markdown``) are derived from it.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from corral.errors import ConfigError

T = TypeVar("T")


def default_home() -> Path:
    if "CORRAL_HOME" in os.environ:
        return Path(os.environ["CORRAL_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    return Path.home() / ".local" / "share" / "corral"


@dataclass(frozen=True)
class Setting:
    """One key of corral.toml, as :func:`setting` declared it."""

    name: str
    type: type
    default: object
    #: One sentence for people: the README's settings list shows it.
    help: str
    #: The only values allowed, if the setting has a fixed set.
    choices: tuple[str, ...] = ()
    #: For a value of the right type: what is wrong with it ("entry 'x'"), or None.
    check: Callable[[Any], str | None] | None = None
    #: How to fix a value ``check`` refused.
    fix: str = ""
    #: False for the settings that a [serve] table may not hold.
    serve: bool = True
    #: corral serve's option that overrides the setting ("" for none), and its help.
    flag: str = ""
    flag_help: str = ""

    def problem(self, value: object, where: str) -> ConfigError | None:
        """Why ``value`` is no value of this setting (in ``where``), or None if it is one."""
        if type(value) is not self.type:
            return ConfigError(
                f"key '{self.name}' in {where} must be a {self.type.__name__}",
                f"e.g. {self.name} = {toml_value(self.default)}",
            )
        if self.choices and value not in self.choices:
            return ConfigError(f"bad {self.name} '{value}' in {where}", self.use_choices)
        bad = self.check(value) if self.check else None
        if bad is not None:
            return ConfigError(f"bad {self.name} {bad} in {where}", self.fix)
        return None

    @property
    def use_choices(self) -> str:
        """The fix for a value outside the choices: "use off, full or proxy"."""
        return f"use {', '.join(self.choices[:-1])} or {self.choices[-1]}"


def toml_value(value: object) -> str:
    """``value`` as corral.toml would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def setting(
    default: T,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    fix: str = "",
    serve: bool = True,
    flag: str = "",
    flag_help: str = "",
) -> T:
    """A field of :class:`Settings` that is a key of corral.toml: the one place that
    declares it (its name and type are the field's)."""
    meta = {
        "help": help,
        "choices": choices,
        "check": check,
        "fix": fix,
        "serve": serve,
        "flag": flag,
        "flag_help": flag_help,
    }
    return field(default=default, metadata={"setting": meta})


def bad_proxy(value: str) -> str | None:
    """The first entry of a ``trusted_proxies`` list that is no address or network."""
    for item in split_list(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"entry '{item}'"
    return None


def bad_range(value: str) -> str | None:
    """Why a ``dhcp_range`` is not two IPv4 addresses, FIRST,LAST (empty is none)."""
    if not value:
        return None
    first, comma, last = value.partition(",")
    try:
        ipaddress.IPv4Address(first)
        ipaddress.IPv4Address(last)
    except ValueError:
        return f"'{value}'" if comma else f"'{value}' (no comma)"
    return None


def split_list(value: str) -> list[str]:
    """The items of a comma-separated setting, without blanks."""
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True)
class Settings:
    """corral's settings: ``home``, and one field per key of corral.toml, each declared by
    :func:`setting` (the table :data:`SETTINGS` is read from these fields)."""

    home: Path
    database_url: str = setting(
        "",
        "SQLAlchemy URL of the inventory database; empty: SQLite in `$CORRAL_HOME/corral.db`.",
        serve=False,
    )
    server_url: str = setting(
        "http://10.0.0.1:8080",
        "Base URL at which nodes reach corral's HTTP server, rendered into boot files; "
        "unset: `http://ADDRESS:HTTP_PORT` when `address` is one address, else this default.",
        serve=False,
    )
    template_dir: str = setting(
        "",
        "Site templates that override the packaged ones, file by file; "
        "empty: `$CORRAL_HOME/templates`.",
        serve=False,
    )
    address: str = setting(
        "0.0.0.0",
        "Address corral serve listens on.",
        flag="--address",
        flag_help="address to listen on",
    )
    http_port: int = setting(
        8080, "corral serve's HTTP port.", flag="--http-port", flag_help="HTTP port"
    )
    tftp_port: int = setting(
        69,
        "corral serve's TFTP port; 0: no TFTP.",
        flag="--tftp-port",
        flag_help="TFTP port, 0 for none",
    )
    dhcp: str = setting(
        "off",
        "DHCP (dnsmasq): none (`off`), a DHCP server with reservations (`full`), "
        "or boot options beside a site's DHCP server (`proxy`).",
        choices=("off", "full", "proxy"),
        flag="--dhcp",
        flag_help="off, full or proxy",
    )
    dhcp_interface: str = setting(
        "",
        "Interface on which nodes boot, that DHCP serves.",
        flag="--dhcp-interface",
        flag_help="interface for DHCP",
    )
    dhcp_range: str = setting(
        "",
        "`FIRST,LAST`: addresses for unknown machines (full mode).",
        check=bad_range,
        fix="give FIRST,LAST, e.g. 10.0.0.200,10.0.0.250",
        flag="--dhcp-range",
        flag_help="FIRST,LAST addresses for unknown machines (full mode)",
    )
    dhcp_ipv6_ra: bool = setting(
        False, "Send router advertisements on a boot network without a router."
    )
    access_log: str = setting(
        "quiet",
        "HTTP access log: every request (`all`), all but the installing nodes' successful "
        "image chunks and progress reports, which `--debug` shows too (`quiet`), or none "
        "(`off`).",
        choices=("all", "quiet", "off"),
    )
    api_token: str = setting(
        "",
        "Bearer token of the admin REST API; empty: generated into `$CORRAL_HOME/api-token`.",
    )
    trusted_proxies: str = setting(
        "",
        "Reverse proxies whose `X-Forwarded-For` / `X-Forwarded-Proto` corral believes, as "
        "comma-separated addresses or networks; empty: the headers are ignored (a client "
        "could otherwise claim a node's address and take its install secrets).",
        check=bad_proxy,
        fix="give addresses or networks of your reverse proxies, e.g. 10.0.0.2,10.0.5.0/24",
    )
    discovery_max_nodes: int = setting(
        1000,
        'Discovery (unauthenticated): at most this many nodes in state "discovered".',
    )
    discovery_per_minute: int = setting(60, "Discovery: at most this many new nodes a minute.")
    ramdisk_dir: str = setting(
        "",
        "The deploy/discovery ramdisk (vmlinuz, initrd.img) that image installs boot; "
        "empty: `$CORRAL_HOME/ramdisk`.",
    )
    rsync_port: int = setting(
        873, "Port of the rsync daemon corral starts for the rsync transport."
    )
    deploy_node_timeout: float = setting(
        25.0,
        "Seconds after which a node silent mid-install is failed (25: reported within 30 s, "
        "with the deployment manager's one-second tick).",
    )
    deploy_boot_timeout: float = setting(
        900.0, "Seconds after which a node that never asked for its plan is failed."
    )
    firstboot_timeout: float = setting(
        900.0,
        "Seconds after which a node its agent rebooted into its installed system is failed "
        "if that system has not reported its first boot (0: wait for ever); servers take "
        "minutes to POST, and a first boot may resize or relabel file systems.",
    )
    timeout_pxe: float = setting(
        600.0,
        "Seconds a node that started to network-boot may wait between the boot steps corral "
        "serves it (DHCP, boot program, its configuration, kernel, initrd) and until its "
        "ramdisk or installer reports `booted`; a server's firmware may take minutes.",
    )
    timeout_booted: float = setting(
        1800.0,
        "Seconds a node may stay in `booted`: a kickstart installer fetching its stage 2 and "
        "reaching `%pre`, or a deploy ramdisk asking for its plan.",
    )
    timeout_pre_install: float = setting(
        7200.0,
        "Seconds from a kickstart's `%pre` to its `%post`: the packages install meanwhile.",
    )
    timeout_partitioning: float = setting(
        1800.0, "Seconds an image install may spend partitioning and formatting its disks."
    )
    timeout_receiving: float = setting(
        14400.0,
        "Seconds an image install may spend receiving its image (a node that stops "
        "reporting fails sooner, after `deploy_node_timeout`).",
    )
    timeout_configuring: float = setting(
        900.0, "Seconds an image install may spend writing the node's identity."
    )
    timeout_bootloader: float = setting(
        900.0, "Seconds an image install may spend installing its boot loader."
    )
    timeout_post_install: float = setting(
        3600.0, "Seconds the profile's post-install script may run (kickstart or image)."
    )
    power_pool: int = setting(
        32,
        "BMCs corral talks to at once (power on, off, cycle, status): a hundred nodes answering "
        "in a second each are all done in about 4 s.",
        check=lambda v: None if v >= 1 else f"{v} (fewer than 1)",
        fix="give 1 or more",
    )
    power_timeout: float = setting(
        20.0,
        "Seconds a BMC has to carry out a power operation before corral gives up on it and "
        "reports the node failed in the phase `power`, naming the BMC.",
        check=lambda v: None if v > 0 else f"{v} (not above 0)",
        fix="give a number of seconds above 0",
    )
    event_retention_days: float = setting(
        90.0,
        "Days the nodes' event history is kept; older events are deleted (0: kept for ever).",
    )
    diskless_window: float = setting(
        10.0,
        "Seconds the diskless nodes that boot on their own (not by `corral boot`) are gathered "
        "into one session per image version: the first one waits this long for others.",
    )
    diskless_transport: str = setting(
        "auto",
        "Transport of the diskless nodes that boot on their own; `auto` picks by their number "
        "when the gathering window closes.",
    )
    multicast_mode: str = setting(
        "acked",
        "Multicast (udpcast) mode: `acked`, the sender goes at its slowest receiver's pace "
        "(a slow one leaves for HTTP); `async`, it never waits, and each node fetches over "
        "HTTP the chunks it lost.",
        choices=("acked", "async"),
    )
    multicast_max_bitrate: str = setting(
        "19m",
        "Multicast (udpcast) sending rate, under the slowest node link that should keep up "
        '(`"19m"` suits 20 Mbit/s links, about `"900m"` a gigabit network).',
    )
    multicast_fec: str = setting(
        "auto",
        'Multicast forward error correction, `INTERLEAVExREDUNDANCY/STRIPESIZE`; `""`: none; '
        "`auto`: 8x4/128 in acked mode, 8x8/128 in async mode (no retransmissions there).",
    )
    multicast_max_wait: float = setting(
        60.0,
        "Seconds a multicast session waits for its nodes after the first one joined.",
    )
    multicast_catchup_bitrate: str = setting(
        "",
        "Rate that the HTTP catch-ups of one multicast session share, served under it by "
        'corral (`""`: the multicast rate); keep it plus the multicast rate under the '
        'server\'s link (`"5g"` for a 10 GbE server and gigabit nodes).',
    )
    chain_max_wait: float = setting(
        60.0,
        "Seconds a chain waits for its nodes after the first one asked for its plan, "
        "before it starts with those there (later ones join at its tail).",
    )

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'corral.db'}"

    @property
    def templates(self) -> Path:
        return Path(self.template_dir) if self.template_dir else self.home / "templates"

    @property
    def ramdisk(self) -> Path:
        return Path(self.ramdisk_dir) if self.ramdisk_dir else self.home / "ramdisk"


def _table() -> tuple[Setting, ...]:
    types = get_type_hints(Settings)
    return tuple(
        Setting(name=f.name, type=types[f.name], default=f.default, **f.metadata["setting"])
        for f in fields(Settings)
        if "setting" in f.metadata
    )


#: Every key of corral.toml, in the order of :class:`Settings`.
SETTINGS = _table()
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
#: The settings that are not corral serve's: a [serve] table may not hold them.
GENERAL_KEYS = tuple(s.name for s in SETTINGS if not s.serve)
#: The settings that corral serve's options override, in the order of its --help.
SERVE_OPTIONS = tuple(s for s in SETTINGS if s.flag)


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
        for key, value in _flatten(data, path).items():
            known = SETTINGS_BY_NAME.get(key)
            if known is None:
                raise ConfigError(
                    f"unknown key '{key}' in {path}",
                    f"known keys: {', '.join(sorted(SETTINGS_BY_NAME))}",
                )
            problem = known.problem(value, str(path))
            if problem is not None:
                raise problem
            values[key] = value
    if "server_url" not in values:
        # As corral serve does: nodes reach corral where it listens, if that is one address.
        address = values.get("address", Settings.address)
        port = values.get("http_port", Settings.http_port)
        assert isinstance(address, str) and isinstance(port, int)  # their types are checked
        values["server_url"] = listening_url(address, port) or Settings.server_url
    return Settings(home=home, **values)  # type: ignore[arg-type]


def with_serve_options(settings: Settings, options: Mapping[str, Any]) -> Settings:
    """``settings`` with corral serve's options (:data:`SERVE_OPTIONS`; None: not given)
    in place of the config's: what serve and everything it starts use. A server_url the
    config did not set follows the address and port, as :func:`load_settings` derives it."""
    given = replace(settings, **{k: v for k, v in options.items() if v is not None})
    derived = (Settings.server_url, listening_url(settings.address, settings.http_port))
    here = listening_url(given.address, given.http_port)
    if settings.server_url in derived and here:
        # No server URL configured: nodes reach corral where it listens.
        given = replace(given, server_url=here)
    return given


def settings_markdown() -> str:
    """The README's list of settings: a Markdown table made from :data:`SETTINGS`."""
    lines = ["| Setting | Default | What it does |", "| --- | --- | --- |"]
    for s in SETTINGS:
        text = s.help
        if s.flag:
            text += f" `corral serve {s.flag}` overrides it."
        if not s.serve:
            text += " Not in `[serve]`."
        cells = (f"`{s.name}`", f"`{toml_value(s.default)}`", text)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m corral.config --markdown``: print the README's list of settings."""
    if argv != ["--markdown"]:
        print("usage: python -m corral.config --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(settings_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
